"""Steps/s of the distillation loop with overlapped rollouts: ``rollout.max_staleness`` k = 0 (the synchronous
loop), 1 and 2 on the CPU demo setup (the shipped task models and ``experiment.TaskRun``'s batch), side by side in
one run.

Every k runs the same configuration (old log-probs from the rollout, so that k = 0 does no extra pass) for
``--steps`` steps; steps/s is measured over the steps after ``--warmup`` from each step's wall time
(``time_step``), next to where the time went: the trainer waiting for rollouts, the producer waiting for the
trainer, generation + teacher scoring, and the optimizer steps. "hidden" is the share of generation time the
trainer did not wait for, 1 - time_wait_rollout / time_generate (0 for the synchronous loop): what overlapping buys
when the servers run on their own devices; on shared cores the two sides slow each other down instead.

    OMP_NUM_THREADS=1 python bench/bench_overlap.py --steps 6 --tp 1 [--write BENCHMARKS.md]
"""

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_bpd.experiment import SHIPPED_MODELS, TaskRun, launch_config  # noqa: E402

COLUMNS = ("time_step", "time_wait_rollout", "time_wait_train", "time_generate", "time_train")


def run(k: int, root: Path, prompts: Path, args) -> dict:
    gate = {"granularity": "block", "block_size": args.block_size}
    run = TaskRun(str(root / f"k{k}"), str(SHIPPED_MODELS / "student"), str(SHIPPED_MODELS / "teacher"),
                  str(prompts), "", gate=gate, steps=args.steps, seed=args.seed, lr=args.lr, tp=args.tp, eval_every=0)
    if args.smoke:
        run = run.replace(prompts_per_step=4, max_new_tokens=8, minibatches=1, micro_batch_size=4)
    config = run.config()
    config["rollout"]["max_staleness"] = k
    config["reuse"]["old_logprobs"] = "rollout"
    steady = launch_config(config)["metrics"][args.warmup:]
    result = {"k": k, "steps_per_s": len(steady) / sum(r["time_step"] for r in steady),
              "staleness_max": max(r["staleness_max"] for r in steady)}
    result.update({key: sum(r[key] for r in steady) / len(steady) for key in COLUMNS})
    return result


def table(results: list) -> str:
    base = results[0]["steps_per_s"]
    lines = ["| k | steps/s | vs k=0 | staleness max | hidden | " + " | ".join(f"{c} (s)" for c in COLUMNS) + " |",
             "|---" * (5 + len(COLUMNS)) + "|"]
    for r in results:
        hidden = max(0.0, 1 - r["time_wait_rollout"] / r["time_generate"])
        lines.append(f"| {r['k']} | {r['steps_per_s']:.4f} | {r['steps_per_s'] / base:.2f} | {r['staleness_max']} | "
                     f"{hidden:.2f} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out (start-up, k steps of warm-up)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=None, help="append the table to this Markdown file")
    parser.add_argument("--smoke", action="store_true", help="seconds: k = 1, 2 steps of 4 prompts x 8 tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ks, args.steps, args.warmup = [1], 2, 1
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")

    from megatron_bpd.tasks.common import write_prompts_jsonl
    from megatron_bpd.tasks.sft import PrepConfig, datasets

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prompts = write_prompts_jsonl(root / "prompts.jsonl", datasets(PrepConfig(seed=args.seed))[0][:2000])
        results = [run(k, root, prompts, args) for k in args.ks]
    report = table(results)
    print(report)
    print(json.dumps(results))
    if args.write:
        with open(args.write, "a") as f:
            f.write(f"\n{report}\n\n{platform.processor() or platform.machine()}, {args.steps} steps, the first "
                    f"{args.warmup} left out, TP={args.tp}.\n")


if __name__ == "__main__":
    main()
