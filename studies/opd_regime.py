"""The regime where on-policy distillation lifts the student (issue 10): OPD variants against the off-policy control
(SFT on teacher samples, the same optimizer updates), several seeds, held-out curves.

    python -m studies.opd_regime --out docs/results/opd_regime_40steps --seeds 0 1 2 [--variants ...] [--steps 40 ...]
    python -m studies.opd_regime --quick --out runs/opd_quick          # smoke test (< 3 min), never into docs/

Every run is the trainer (``experiment.launch``: torchrun, embedded SGLang-protocol servers) on the addition task
with the shipped teacher and student (``megatron_bpd/data/task_models``), and every number is the trainer's own
held-out evaluation (``train/evaluation.py``: greedy accuracy and pass@1 at T=1 / top-p 0.9 on the same held-out
problems, before training and every ``--eval-every`` steps). The runs are kept in ``OUT/runs.tar.xz`` (a later call
trains only the missing ones; ``--report-only`` none). Writes ``OUT/results.json``, ``OUT/report.md`` and
``OUT/eval_curves.png``.
"""

from __future__ import annotations

import statistics

from megatron_bpd.experiment import TaskRun, mean_std, paired

from .study import Study

VARIANTS = {
    "sampled_token": ("sampled-token OPD", {"loss": "sampled_token"}),
    "topk_lsm": ("Teacher-TopK/LSM", {"loss": "topk_lsm"}),
    "sft_control": ("control: SFT on teacher samples", {"loss": "sft"}),
}


class OPDRegime(Study):
    """Each variant of ``VARIANTS`` at every seed, one schedule (``--steps``, ``--lr``, ``--epochs``, ...)."""

    name = "opd_regime"

    def arguments(self, parser):
        parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
        parser.add_argument("--lr", type=float, default=TaskRun.lr)
        parser.add_argument("--epochs", type=int, default=TaskRun.epochs, help="reuse epochs per rollout batch")
        parser.add_argument("--minibatches", type=int, default=TaskRun.minibatches, help="mini-batches per epoch")
        parser.add_argument("--adv-clip", type=float, default=5.0,  # the trainer's default, stated in the report
                            help="the sampled-token loss's advantage clamp (loss.adv_clip)")
        parser.add_argument("--tp", type=int, default=1)

    def plan(self, args):
        return [(variant, seed) for variant in args.variants for seed in args.seeds]

    def run_name(self, variant):
        return variant

    def configure(self, variant, base, args):
        return base.replace(lr=args.lr, tp=args.tp, epochs=args.epochs, minibatches=args.minibatches,
                            overrides={"loss.adv_clip": args.adv_clip}, **VARIANTS[variant][1])

    def summarize(self, runs, missing, args):
        rows, table = [], {}
        for (variant, seed), run in runs.items():
            before, after = run["evals"][0], run["evals"][-1]
            rows.append({"variant": variant, "loss": VARIANTS[variant][1]["loss"], "seed": seed,
                         "greedy_before": before["student"]["greedy"], "greedy": after["student"]["greedy"],
                         "pass1_before": before["student"]["pass1"], "pass1": after["student"]["pass1"],
                         "greedy_ci": after["student"]["greedy_ci"], "pass1_ci": after["student"]["pass1_ci"],
                         "support_kl_before": before.get("support_kl"), "support_kl": after.get("support_kl"),
                         "teacher_greedy": before["teacher"]["greedy"], "teacher_pass1": before["teacher"]["pass1"],
                         "curve": [{"step": e["step"], "greedy": e["student"]["greedy"],
                                    "pass1": e["student"]["pass1"], "support_kl": e.get("support_kl")}
                                   for e in run["evals"]],
                         "seconds": run["seconds"]})
        for variant in args.variants:
            mine = [r for r in rows if r["variant"] == variant]
            table[variant] = {key: mean_std([r[key] for r in mine]) for key in
                              ("greedy", "pass1", "support_kl", "seconds")}
            table[variant]["gain_greedy"] = mean_std([r["greedy"] - r["greedy_before"] for r in mine])
            table[variant]["gain_pass1"] = mean_std([r["pass1"] - r["pass1_before"] for r in mine])
        return {"runs": rows, "table": table}

    def plot(self, summary, runs, args):
        plot(summary, args.out / "eval_curves.png")

    def report(self, summary, runs, args):
        return report(summary, args, args.command)


def paired_variants(summary: dict, a: str, b: str, key: str) -> dict | None:
    """Per-seed differences ``a - b`` of ``key`` (same seed: same prompts order and evaluation problems)."""
    by_variant = lambda v: {r["seed"]: r[key] for r in summary["runs"] if r["variant"] == v}  # noqa: E731
    return paired(by_variant(a), by_variant(b))


def plot(summary: dict, path) -> None:
    """Held-out greedy accuracy, pass@1 and probe KL by step: the mean of each variant and its seeds."""
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
    """The report: the table per variant, the paired comparison against the control, one row per run."""
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

**Machine:** {args.machine['machine']} CPU, OMP_NUM_THREADS=1, Python {args.machine['python']}. **Budget per run:**
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


if __name__ == "__main__":
    OPDRegime().main()
