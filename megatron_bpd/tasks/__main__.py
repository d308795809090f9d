"""``python -m megatron_bpd.tasks --out DIR [--task NAME]``: prepare a task's teacher and student (cached), write the
prompt files ``DIR/train.jsonl`` / ``DIR/test.jsonl`` and ``DIR/summary.json`` (accuracies, timings, paths)."""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from megatron_bpd.tasks.common import write_prompts_jsonl
from megatron_bpd.tasks.registry import TASKS
from megatron_bpd.tasks.sft import datasets, prepare_teacher_and_student, recipe


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m megatron_bpd.tasks", description=__doc__)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default=None, help="model cache folder (default: OUT/models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=sorted(TASKS), default="addition")
    p.add_argument("--difficulties", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="the range of the horizon knob (addition: digits; running_sum: items)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is far faster than 2 when the cores are shared with other work)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    cfg = recipe(args.task, args.seed)
    if args.difficulties:
        cfg = replace(cfg, difficulties=tuple(args.difficulties))
    if args.n_train:
        cfg = replace(cfg, n_train=args.n_train)
    if args.n_test:
        cfg = replace(cfg, n_test=args.n_test)
    if args.teacher_steps:
        cfg = replace(cfg, teacher=replace(cfg.teacher, steps=args.teacher_steps))
    if args.student_steps:
        cfg = replace(cfg, student=replace(cfg.student, steps=args.student_steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = prepare_teacher_and_student(args.cache or out / "models", cfg.seed, config=cfg, threads=args.threads,
                                          progress=not args.no_progress)
    train, test = datasets(cfg)
    summary["train_jsonl"] = str(write_prompts_jsonl(out / "train.jsonl", train))
    summary["test_jsonl"] = str(write_prompts_jsonl(out / "test.jsonl", test))
    summary["cli_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    print(f"[tasks] teacher {summary['teacher']['accuracy']:.3f}, student {summary['student']['accuracy']:.3f}; "
          f"wrote {out}/train.jsonl, test.jsonl, summary.json")
    return summary


if __name__ == "__main__":
    main()
