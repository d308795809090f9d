"""The regime where on-policy distillation lifts the student (issue 10): OPD variants against the off-policy control
(SFT on teacher samples, the same optimizer updates), several seeds, held-out curves.

    python bench/opd_regime.py --out docs/results/opd_regime [--seeds 0 1 2] [--variants ...]
    python bench/opd_regime.py --quick --out /tmp/opd_quick          # smoke test (< 3 min), never into docs/

Every run is the trainer (``experiment.launch``: torchrun, embedded SGLang-protocol servers) on the addition task
with the shipped teacher and student (``megatron_bpd/data/task_models``), and every number is the trainer's own
held-out evaluation (``train/evaluation.py``: greedy accuracy and pass@1 at T=1 / top-p 0.9 on the same held-out
problems, before training and every ``--eval-every`` steps). Runs are cached by folder
(``OUT/runs/<variant>/seed<k>/run.json``): a later call skips finished runs. Writes ``OUT/results.json``,
``OUT/report.md`` and ``OUT/eval_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_bpd.experiment import SHIPPED_MODELS, TaskRun, launch, mean_std, paired, read_run, task_prompts  # noqa: E402

VARIANTS = {
    "sampled_token": ("sampled-token OPD", {"loss": "sampled_token"}),
    "topk_lsm": ("Teacher-TopK/LSM", {"loss": "topk_lsm"}),
    "sft_control": ("control: SFT on teacher samples", {"loss": "sft"}),
}


def log(msg: str) -> None:
    print(f"[opd-regime {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_run(out: Path, args) -> TaskRun:
    prompts, eval_prompts = task_prompts(out / "data", args.eval_problems)
    return TaskRun(out="", student=str(SHIPPED_MODELS / "student"), teacher=str(SHIPPED_MODELS / "teacher"),
                   prompts=prompts, eval_prompts=eval_prompts, steps=args.steps, lr=args.lr, tp=args.tp,
                   epochs=args.epochs, minibatches=args.minibatches, adv_clip=args.adv_clip,
                   eval_every=args.eval_every, eval_limit=args.eval_problems, eval_samples=args.eval_samples)


def run_all(out: Path, args) -> dict:
    base = base_run(out, args)
    runs = {}
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = out / "runs" / variant / f"seed{seed}"
            if not (run_dir / "run.json").exists():
                log(f"{variant} seed {seed} -> {run_dir}")
                result = launch(base.replace(out=str(run_dir), seed=seed, **VARIANTS[variant][1]))
                log(f"{variant} seed {seed}: greedy {result['evals'][0]['student']['greedy']:.3f} -> "
                    f"{result['evals'][-1]['student']['greedy']:.3f} in {result['seconds']:.0f} s")
            runs[(variant, seed)] = read_run(run_dir)
    return runs


def summarize(runs: dict, args) -> dict:
    rows, table = [], {}
    for (variant, seed), run in runs.items():
        before, after = run["evals"][0], run["evals"][-1]
        rows.append({"variant": variant, "loss": VARIANTS[variant][1]["loss"], "seed": seed,
                     "greedy_before": before["student"]["greedy"], "greedy": after["student"]["greedy"],
                     "pass1_before": before["student"]["pass1"], "pass1": after["student"]["pass1"],
                     "greedy_ci": after["student"]["greedy_ci"], "pass1_ci": after["student"]["pass1_ci"],
                     "support_kl_before": before.get("support_kl"), "support_kl": after.get("support_kl"),
                     "teacher_greedy": before["teacher"]["greedy"], "teacher_pass1": before["teacher"]["pass1"],
                     "curve": [{"step": e["step"], "greedy": e["student"]["greedy"], "pass1": e["student"]["pass1"],
                                "support_kl": e.get("support_kl")} for e in run["evals"]],
                     "seconds": run["seconds"]})
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        table[variant] = {key: mean_std([r[key] for r in mine]) for key in
                          ("greedy", "pass1", "support_kl", "seconds")}
        table[variant]["gain_greedy"] = mean_std([r["greedy"] - r["greedy_before"] for r in mine])
        table[variant]["gain_pass1"] = mean_std([r["pass1"] - r["pass1_before"] for r in mine])
    return {"runs": rows, "table": table}


def paired_variants(summary: dict, a: str, b: str, key: str) -> dict | None:
    """Per-seed differences ``a - b`` of ``key`` (same seed: same prompts order and evaluation problems)."""
    by_variant = lambda v: {r["seed"]: r[key] for r in summary["runs"] if r["variant"] == v}  # noqa: E731
    return paired(by_variant(a), by_variant(b))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for variant, (label, _) in VARIANTS.items():
        mine = [r for r in summary["runs"] if r["variant"] == variant]
        if not mine:
            continue
        steps = [p["step"] for p in mine[0]["curve"]]
        for ax, key in zip(axes, ("greedy", "pass1", "support_kl")):
            values = [[p[key] for p in r["curve"]] for r in mine]
            mean = [statistics.fmean(col) for col in zip(*values)]
            line, = ax.plot(steps, mean, marker="o", label=f"{label} ({len(mine)} seeds)")
            for v in values:
                ax.plot(steps, v, color=line.get_color(), alpha=0.25, linewidth=0.8)
    teacher = summary["runs"][0]
    axes[0].axhline(teacher["teacher_greedy"], color="gray", linestyle="--", label="teacher")
    axes[1].axhline(teacher["teacher_pass1"], color="gray", linestyle="--", label="teacher")
    axes[0].set(title="held-out greedy accuracy", xlabel="step", ylim=(-0.02, 1.02))
    axes[1].set(title="held-out pass@1 (T=1, top-p 0.9)", xlabel="step", ylim=(-0.02, 1.02))
    axes[2].set(title="student-teacher KL on the teacher's top-K (probe)", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict, args, command: str) -> str:
    t, runs = summary["table"], summary["runs"]
    first = runs[0]
    lines = [f"| base student | - | {first['greedy_before']:.3f} | {first['pass1_before']:.3f} | - | - | "
             f"{first['support_kl_before']:.4f} | - |",
             f"| teacher | - | {first['teacher_greedy']:.3f} | {first['teacher_pass1']:.3f} | - | - | - | - |"]
    for variant in args.variants:
        row = t[variant]
        lines.append(f"| {VARIANTS[variant][0]} | {row['greedy']['n']} | {row['greedy']['mean']:.3f} ± "
                     f"{row['greedy']['std']:.3f} | {row['pass1']['mean']:.3f} ± {row['pass1']['std']:.3f} | "
                     f"{row['gain_greedy']['mean']:+.3f} ± {row['gain_greedy']['std']:.3f} | "
                     f"{row['gain_pass1']['mean']:+.3f} ± {row['gain_pass1']['std']:.3f} | "
                     f"{row['support_kl']['mean']:.4f} | {row['seconds']['mean'] / 60:.1f} |")
    per_seed = "\n".join(f"| {VARIANTS[r['variant']][0]} | {r['seed']} | {r['greedy_before']:.3f} -> {r['greedy']:.3f} "
                         f"[{r['greedy_ci'][0]:.3f}, {r['greedy_ci'][1]:.3f}] | {r['pass1_before']:.3f} -> "
                         f"{r['pass1']:.3f} | {r['seconds'] / 60:.1f} |" for r in runs)
    comparisons = []
    for variant in args.variants:
        if variant != "sft_control" and "sft_control" in args.variants:
            for key in ("greedy", "pass1"):
                p = paired_variants(summary, variant, "sft_control", key)
                if p:
                    comparisons.append(f"- {VARIANTS[variant][0]} - control, {key}: {p['mean']:+.3f} ± {p['std']:.3f} "
                                       f"(per seed: {', '.join(f'{d:+.3f}' for d in p['diffs'])})")
    return f"""# On-policy distillation that lifts the student (issue 10): results

Made by:

    {command}

**Machine:** {platform.machine()} CPU, OMP_NUM_THREADS=1, Python {platform.python_version()}. **Budget per run:**
{args.steps} steps x 64 prompts x 1 sample, {args.epochs} epoch(s) x {args.minibatches} mini-batches
({args.epochs * args.minibatches} optimizer updates per rollout batch), Adam lr {args.lr:g}, sampled-token advantage
clamp {args.adv_clip:g}, TP={args.tp}; held-out evaluation of {args.eval_problems} problems every {args.eval_every}
steps (greedy, and pass@1 from {args.eval_samples} samples at T=1 / top-p 0.9). The control trains on teacher
samples with the NLL loss, with the same prompts, updates and lr. Mean ± std over seeds (sample std); the
seed sets the prompt order and the rollout samples, the teacher/student pair is the same.

| variant | seeds | greedy | pass@1 | gain greedy | gain pass@1 | probe KL (end) | minutes/run |
|---|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Paired per seed against the control:

{chr(10).join(comparisons) or '- (no control in this sweep)'}

Per run (greedy with its 95% Wilson interval over the held-out problems):

| variant | seed | greedy before -> after | pass@1 before -> after | minutes |
|---|---|---|---|---|
{per_seed}

![held-out curves](eval_curves.png)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=TaskRun.steps)
    parser.add_argument("--lr", type=float, default=TaskRun.lr)
    parser.add_argument("--epochs", type=int, default=TaskRun.epochs, help="reuse epochs per rollout batch")
    parser.add_argument("--minibatches", type=int, default=TaskRun.minibatches, help="mini-batches per epoch")
    parser.add_argument("--adv-clip", type=float, default=TaskRun.adv_clip,
                        help="the sampled-token loss's advantage clamp (loss.adv_clip)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=TaskRun.eval_every)
    parser.add_argument("--eval-problems", type=int, default=TaskRun.eval_limit)
    parser.add_argument("--eval-samples", type=int, default=TaskRun.eval_samples)
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 seed, 8 problems: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_every, args.eval_problems, args.eval_samples = 2, [0], 1, 8, 2
    if args.quick and (ROOT / "docs") in args.out.resolve().parents:
        parser.error("--quick never writes into docs/: give a scratch --out")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/opd_regime.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = summarize(run_all(out, args), args)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out / "eval_curves.png")
    (out / "report.md").write_text(report(summary, args, command))
    log(f"wrote {out / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
