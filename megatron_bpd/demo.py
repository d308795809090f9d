"""The complete distillation on a CPU machine, in minutes: ``python -m megatron_bpd.demo --out DIR``.

1. Takes the shipped tiny Qwen3 teacher that solves column addition step by step and the smaller, weaker student
   (``megatron_bpd/data/task_models``; ``--prepare`` makes them anew with ``megatron_bpd.tasks``, ~3-5 min).
2. Trains the student with sampled-token OPD + Block gate at TP=2 over gloo (``torchrun`` of
   ``megatron_bpd.train``), with the project's SGLang-protocol servers for rollouts and teacher scores.
3. Evaluates base student, distilled student and teacher on held-out problems (greedy exact match).
4. Writes ``DIR/metrics.jsonl`` (one object per step), ``DIR/tensorboard/``, ``DIR/training.png``,
   ``DIR/config.yaml`` and ``DIR/report.md``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

SHIPPED_MODELS = Path(__file__).parent / "data" / "task_models"


def demo_config(out: Path, student: str, teacher: str, prompts: str, args) -> dict:
    """The run: sampled-token OPD, Block gate sized to the task's ~10-line responses, 2 reuse epochs."""
    return {
        "out": str(out), "steps": args.steps, "seed": args.seed,
        "model": {"student": student},
        "parallel": {"tp": args.tp},
        "data": {"prompts": prompts, "answer_checker": "arithmetic", "apply_chat_template": True},
        "rollout": {"prompts_per_step": 8, "samples_per_prompt": 8, "temperature": 1.0, "top_p": 0.9,
                    "max_new_tokens": 160, "max_concurrency": 16},
        "teacher": {"source": "sglang", "model": teacher, "top_k": 8},
        "loss": {"kind": "sampled_token", "gate": {"granularity": "block", "block_size": args.block_size}},
        "reuse": {"epochs": 2, "minibatches": 4, "micro_batch_size": 4},
        "optimizer": {"optimizer": "adam", "lr": args.lr, "clip_grad": 1.0},
    }


def train(config_path: Path, tp: int, log_path: Path) -> None:
    """torchrun of the trainer on ``tp`` local processes (gloo); its output goes to ``log_path``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
           "-m", "megatron_bpd.train", "--config", str(config_path)]
    print(f"[demo] {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _follow(process, log_path.parent / "metrics.jsonl")
    if process.returncode != 0:
        raise RuntimeError(f"training failed ({process.returncode}); last lines of {log_path}:\n"
                           + "\n".join(log_path.read_text().splitlines()[-30:]))


def _follow(process, metrics_path: Path) -> None:
    """Print one line per finished step while the trainer runs."""
    seen = 0
    while process.poll() is None:
        time.sleep(2)
        if metrics_path.exists():
            lines = metrics_path.read_text().splitlines()
            for line in lines[seen:]:
                r = json.loads(line)
                print(f"[demo] step {r['step']:3d}  loss {r.get('loss', float('nan')):+.4f}  "
                      f"solve {r.get('solve_rate', float('nan')):.2f}  |drift| {r.get('drift_abs_mean', 0):.4f}  "
                      f"gate {r.get('gate_min', 1):.3f}..{r.get('gate_max', 1):.3f}", flush=True)
            seen = len(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--prepare", action="store_true",
                        help="SFT a new teacher and student (cached in ~/.cache/megatron-bpd/task-models) instead of "
                             "using the shipped ones")
    args = parser.parse_args(argv)

    from .tasks.arithmetic import write_prompts_jsonl
    from .tasks.sft import PrepConfig, accuracy, datasets, prepare_teacher_and_student
    from .train.metrics import plot_metrics, read_metrics

    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "tensorboard", "weights"):  # a rerun into the same folder starts clean
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    prep = PrepConfig(seed=args.seed)
    if args.prepare:
        summary = prepare_teacher_and_student(Path.home() / ".cache" / "megatron-bpd" / "task-models", args.seed,
                                              config=prep)
        models = {role: summary[role]["path"] for role in ("teacher", "student")}
    else:
        models = {role: str(SHIPPED_MODELS / role) for role in ("teacher", "student")}
    train_set, test_set = datasets(prep)
    prompts = write_prompts_jsonl(out / "prompts.jsonl", train_set[:2000])
    config = demo_config(out, models["student"], models["teacher"], str(prompts), args)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    train(config_path, args.tp, out / "train.log")
    records = read_metrics(out / "metrics.jsonl")
    plot_metrics(records, out / "training.png", "sampled-token OPD + Block gate, TP=2 (CPU demo)")

    final = max((p for p in (out / "weights").iterdir()), key=lambda p: int(p.name))
    problems = test_set[:args.eval_problems]
    scores = {name: accuracy(path, problems) for name, path in
              (("student before", models["student"]), ("student after", final), ("teacher", models["teacher"]))}
    report = _report(config, records, scores, len(problems), time.perf_counter() - started)
    (out / "report.md").write_text(report)
    print(report)
    return scores


def _report(config: dict, records: list, scores: dict, n: int, seconds: float) -> str:
    first, last = records[0], records[-1]
    rows = "\n".join(f"| {name} | {acc:.3f} |" for name, acc in scores.items())
    gate = config["loss"]["gate"]
    return f"""# megatron-bpd CPU demo

Sampled-token OPD with a Block-{gate['block_size']} drift gate, {config['steps']} steps at TP={config['parallel']['tp']}
(gloo), {config['rollout']['prompts_per_step']} prompts x {config['rollout']['samples_per_prompt']} samples per step,
{config['reuse']['epochs']} reuse epochs x {config['reuse']['minibatches']} mini-batches. Total time {seconds / 60:.1f} min.

## Greedy exact-match accuracy on {n} held-out addition problems

| model | accuracy |
|---|---|
{rows}

## Training

| | step {first['step']} | step {last['step']} |
|---|---|---|
| loss | {first.get('loss', float('nan')):.4f} | {last.get('loss', float('nan')):.4f} |
| training solve rate | {first.get('solve_rate', float('nan')):.3f} | {last.get('solve_rate', float('nan')):.3f} |
| teacher-student KL on the top-K support | {first.get('support_kl', float('nan')):.4f} | {last.get('support_kl', float('nan')):.4f} |
| mean token drift from the behavior policy | {first.get('drift_abs_mean', float('nan')):.4f} | {last.get('drift_abs_mean', float('nan')):.4f} |
| gate min / max | {first.get('gate_min', 1):.3f} / {first.get('gate_max', 1):.3f} | {last.get('gate_min', 1):.3f} / {last.get('gate_max', 1):.3f} |
| rollout/train log-prob mismatch | {first.get('rollout_train_mismatch', float('nan')):.2e} | {last.get('rollout_train_mismatch', float('nan')):.2e} |

![training](training.png)

Files: `metrics.jsonl` (one object per step), `tensorboard/`, `config.yaml` (rerun with
`torchrun --standalone --nproc-per-node {config['parallel']['tp']} -m megatron_bpd.train --config config.yaml`), `train.log`.
"""


if __name__ == "__main__":
    main()
