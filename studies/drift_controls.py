"""The drift controls of the field head to head (issue 23): each control of ``loss.drift_control``, the blockwise
gate and AsyncOPD's current-student advantage against no control, where reuse or staleness makes sampled-token OPD
fragile on the addition task (docs/results/gate_robustness.md), paired by seed on a test split no choice has seen.

    python -m studies.drift_controls --out docs/results/drift_controls --regimes reuse stale4 --seeds 0 1 2 3 4
    python -m studies.drift_controls --quick --out runs/drift_controls_quick     # smoke test, never into docs/

Regimes (``REGIMES``, chosen by the gate study, not here): ``reuse`` 8 optimizer updates per rollout at lr 3e-4 with
fresh rollouts (k = 0); ``stale2`` / ``stale4`` 2 updates per rollout with rollouts k = 2 / 4 versions old. Every
setting of a control is its source's default (``method_config.DriftControlConfig``), so the study makes no choice
and reports on ``test`` (``tasks.registry.study_splits``, disjoint from the pair's SFT problems).

Arms (``ARMS``): ``none``; ``proximal`` (pi_old recomputed before the step, ``reuse.old_logprobs: recompute``: under
staleness the controls that read pi_old / pi_behavior need it, so it isolates their own effect; at k = 0 it is
``none``); ``gate`` (Block16, tau 1); ``token_drop``, ``icepop``, ``tis``, ``seq_mask``, ``m2po``; and
``advantage_current`` (``loss.advantage_from: current``). At k = 0 the controls on pi_old / pi_behavior are no-ops
(weight 1) and only ICE-POP runs, as the noise check (``arms_of``). Each is compared seed by seed with ``none`` and,
where it runs on the proximal pi_old, with ``proximal``. The runs are kept in ``OUT/runs.tar.xz``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from megatron_bpd.experiment import mean_std, paired, task_prompts
from megatron_bpd.method_config import RATIOS

from .stats import format_paired, paired_summary
from .study import Study

BLOCK = 16  # the gate study's block on this task (responses of ~40-80 tokens)


@dataclass(frozen=True)
class Regime:
    """Where sampled-token OPD is fragile: ``epochs`` x ``minibatches`` updates per rollout, lr, staleness k."""

    epochs: int
    minibatches: int
    staleness: int
    lr: float = 3e-4
    adv_clip: float = 5.0  # the gate study's default clamp, under which these regimes were found fragile


REGIMES = {"reuse": Regime(2, 4, 0), "stale2": Regime(1, 2, 2), "stale4": Regime(1, 2, 4)}
ARMS = ("none", "proximal", "gate", "token_drop", "icepop", "tis", "seq_mask", "m2po", "advantage_current")
LABELS = {"none": "no control", "proximal": "proximal pi_old (recompute)", "gate": f"Block{BLOCK} gate",
          "token_drop": "token drop (prime-rl)", "icepop": "ICE-POP (NeMo-RL)", "tis": "TIS (verl, slime)",
          "seq_mask": "sequence mask (NeMo-RL)", "m2po": "M2PO",
          "advantage_current": "advantage from current (AsyncOPD)"}


@dataclass(frozen=True)
class Arm:
    regime: str
    control: str = "none"

    @property
    def name(self) -> str:
        return f"{self.regime}-{self.control}"

    @property
    def label(self) -> str:
        return LABELS[self.control]

    @property
    def proximal(self) -> bool:
        """pi_old recomputed before the step (always at k = 0, where it equals the sampler's policy)."""
        return REGIMES[self.regime].staleness == 0 or self.control == "proximal" or \
            RATIOS.get(self.control) == "proximal/behavior"

    def settings(self) -> dict:
        """The trainer settings ("section.key": value) of this arm."""
        regime = REGIMES[self.regime]
        out = {"optimizer.lr": regime.lr, "reuse.epochs": regime.epochs, "reuse.minibatches": regime.minibatches,
               "rollout.max_staleness": regime.staleness, "loss.adv_clip": regime.adv_clip,
               "reuse.old_logprobs": "recompute" if self.proximal else "rollout"}
        if self.control in RATIOS:
            out["loss.drift_control"] = {"kind": self.control}
        elif self.control == "advantage_current":
            out["loss.advantage_from"] = "current"
        return out

    def gate_section(self) -> dict:
        return {"granularity": "block", "block_size": BLOCK} if self.control == "gate" else {"granularity": "none"}

    def references(self) -> list:
        """The arms this one is compared with seed by seed: ``none``, and ``proximal`` where this arm runs on the
        proximal pi_old and that differs from ``none`` (k > 0)."""
        if self.control == "none":
            return []
        refs = [Arm(self.regime)]
        if self.control != "proximal" and self.proximal and REGIMES[self.regime].staleness:
            refs.append(Arm(self.regime, "proximal"))
        return refs


NOISE_CHECK = "icepop"  # the one no-op control run at k = 0: how far a change of < 1e-4 in an update moves a run


def arms_of(regimes: list) -> list:
    """Every arm of ``regimes``; ``proximal`` only where it differs from ``none`` (k > 0). At k = 0 pi_old is the
    sampler's policy, so the controls on pi_old / pi_behavior weigh every position 1: of those only ``NOISE_CHECK``
    runs, as the measure of the noise between two runs that differ by float rounding."""

    def differs(regime: str, control: str) -> bool:
        if REGIMES[regime].staleness:
            return True
        return control != "proximal" and (RATIOS.get(control) != "proximal/behavior" or control == NOISE_CHECK)

    return [Arm(r, c) for r in regimes for c in ARMS if differs(r, c)]


class DriftControls(Study):
    name = "drift_controls"
    eval_every = 20
    eval_samples = 8  # pass@8

    def arguments(self, parser):
        parser.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES))
        parser.add_argument("--controls", nargs="+", choices=ARMS, default=list(ARMS))
        parser.add_argument("--split", choices=("dev", "test"), default="test",
                            help="evaluation split (test: no setting of this study is chosen on it)")

    def arms(self, args) -> list:
        arms = [a for a in arms_of(args.regimes) if a.control in args.controls]
        return [Arm("stale2", "token_drop")] if args.quick else arms

    def plan(self, args):
        return [(arm, seed) for seed in args.seeds for arm in self.arms(args)]  # seed by seed: partial runs pair

    def run_name(self, arm):
        return arm.name

    def prompt_files(self, arm, data_dir, args):
        return task_prompts(data_dir / args.split, args.eval_problems, task=self.task, eval_split=args.split)

    def configure(self, arm, base, args):
        return base.replace(gate=arm.gate_section(), overrides=arm.settings())

    def summarize(self, runs, missing, args):
        rows = [row(arm, seed, run) for (arm, seed), run in runs.items()]
        arms = self.arms(args)
        table = {arm.name: {key: mean_std([r[key] for r in rows if r["config"] == arm.name])
                            for key in ("greedy", "pass1", "pass8", "masked_frac", "seconds")} for arm in arms}
        return {"runs": rows, "table": table, "comparisons": comparisons(rows, arms),
                "meta": {"command": args.command, "split": args.split, "steps": args.steps, "seeds": args.seeds,
                         "missing_runs": missing}}

    def report(self, summary, runs, args):
        return report(summary, self.arms(args), args)


def row(arm: Arm, seed: int, run: dict) -> dict:
    """The results.json row of one run: held-out numbers before and after, and what the control did."""
    before, after = run["evals"][0]["student"], run["evals"][-1]["student"]
    series = lambda key: [m[key] for m in run["metrics"] if key in m]  # noqa: E731
    mean = lambda key: statistics.fmean(series(key)) if series(key) else None  # noqa: E731
    return {
        "regime": arm.regime, "control": arm.control, "arm": arm.label, "config": arm.name, "seed": seed,
        "n_eval": after["n"], "greedy": after["greedy"], "pass1": after["pass1"], "pass8": after.get("pass8"),
        "greedy_before": before["greedy"], "pass1_before": before["pass1"], "pass8_before": before.get("pass8"),
        "masked_frac": mean("drift_masked_frac"), "weight_mean": mean("drift_weight_mean"),
        "weight_max": max(series("drift_weight_max"), default=None), "m2": mean("drift_m2"),
        "drift_abs_mean": mean("drift_abs_mean"), "behavior_drift_abs_mean": mean("behavior_drift_abs_mean"),
        "gate_min": min(series("gate_min"), default=None), "seconds": run["seconds"],
    }


def comparisons(rows: list, arms: list) -> dict:
    """Each arm minus each of its references, paired by seed: pass@8 / pass@1 / greedy means with 95% t intervals
    and the design's minimum detectable effect."""
    by = lambda arm, key: {r["seed"]: r[key] for r in rows if r["config"] == arm.name}  # noqa: E731
    out = {}
    for arm in arms:
        for ref in arm.references():
            out[f"{arm.name} vs {ref.control}"] = {
                "regime": arm.regime, "label": arm.label, "reference": ref.label,
                **{key: paired_summary((paired(by(arm, key), by(ref, key)) or {"diffs": []})["diffs"])
                   for key in ("pass8", "pass1", "greedy")}}
    return out


def _cell(stat: dict, digits: int = 3) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.{digits}f} ± {stat['std'] or 0:.{digits}f}"


def report(summary: dict, arms: list, args) -> str:
    table = summary["table"]
    sections = []
    for regime in dict.fromkeys(a.regime for a in arms):
        r = REGIMES[regime]
        rows = "\n".join(f"| {a.label} | {table[a.name]['greedy']['n']} | "
                         + " | ".join(_cell(table[a.name][k]) for k in ("greedy", "pass1", "pass8", "masked_frac"))
                         + f" | {_cell(table[a.name]['seconds'], 0)} |"
                         for a in arms if a.regime == regime and table[a.name]["greedy"]["n"])
        versus = "\n".join(f"| {c['label']} | {c['reference']} | "
                           + " | ".join(format_paired(c[k]) for k in ("pass8", "pass1", "greedy")) + " |"
                           for c in summary["comparisons"].values() if c["regime"] == regime and c["pass1"]["n"])
        title = f"{regime}: {r.epochs * r.minibatches} updates per rollout, lr {r.lr:g}, staleness k = {r.staleness}"
        sections.append(f"""## {title}

| arm | seeds | greedy | pass@1 | pass@8 | masked fraction | seconds |
|---|---|---|---|---|---|---|
{rows or '| - | - | - | - | - | - | - |'}

Paired by seed (arm minus reference), 95% t interval, minimum detectable effect (5%, 80% power):

| arm | reference | pass@8 | pass@1 | greedy |
|---|---|---|---|---|
{versus or '| - | - | - | - | - |'}
""")
    missing = summary["meta"]["missing_runs"]
    base = [r for r in summary["runs"] if r["control"] == "none"]
    before = mean_std([r["pass1_before"] for r in base])["mean"]
    start = "-" if before is None else f"{before:.3f}"
    return f"""# Drift controls head to head (issue 23): results

Made by:

    {args.command}

The shipped addition pair; {args.steps} steps of 64 prompts x 1 sample at T = 1, top-p 0.9. Evaluated on the
first {args.eval_problems} problems of the `{args.split}` split (disjoint from the pair's SFT set); pass@k from
{args.eval_samples} samples at T = 1 with top-p 0.9. The student before training: pass@1 {start}. "masked fraction"
is the share of response positions a control zeroed. Seconds are whole runs on a shared machine; the train-phase
cost of each control is in `bench/bench_drift_controls.py`.
{'**Not finished:** ' + str(len(missing)) + ' planned runs missing.' if missing else 'Every planned run is in.'}

{chr(10).join(sections)}"""


if __name__ == "__main__":
    DriftControls().main()
