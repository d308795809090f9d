"""The gate where the paper says it matters (issue 22): on-policy distillation on the long-horizon running-sum task
(``tasks/running_sum.py``: one line per item, 24 items ~ 370 response tokens), with paired seeds and a split that no
choice has seen.

    python -m studies.long_horizon --out docs/results/long_horizon --section premise --seeds 0 1 2
    python -m studies.long_horizon --out docs/results/long_horizon --section gate --split test --seeds 0 1 2 3 4 5 6 7
    python -m studies.long_horizon --quick --out runs/long_horizon_quick     # smoke test, never into docs/

Sections (``--section``, several allowed; runs shared between sections train once):

- ``premise``: ungated sampled-token OPD at ``--horizons`` (default 4 / 12 / 22 items; the shipped student scores
  greedy 1.0 / 0.92 / 0.51 on ``dev`` there, 0.13 at 24) with 1 and ``--updates`` optimizer updates per rollout:
  does the gain shrink or reverse with the horizon under reuse? Every run traces the drift of 4 trajectories per
  step, from which the report measures whether the drift is local (``drift_locality``).
- ``gate``: at the long horizon, the gate arms (``GATE_ARMS``: Block-B for B in 16 / 64 / 256, NewlineSpan, tau
  matched to the measured drift, unnormalized gates) against no gate, and the controls (SFT on teacher samples),
  each paired by seed.

Every run evaluates on the ``--split`` of ``tasks.registry.study_splits`` at its horizon: ``dev`` for every choice
(schedule, lr, tau, steps), ``test`` (500 problems) for the reported numbers only. Sampling for pass@k is T = 1 with
top-p 0.9 (the rollout's), not plain T = 1. The runs are kept in ``OUT/runs.tar.xz``; a later call trains only the
missing ones. Writes ``OUT/results.json`` (one row per run), ``OUT/report.md`` and figures.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace

from megatron_bpd.experiment import mean_std, paired, task_prompts

from . import drift_locality
from .stats import format_paired, paired_summary, seeds_for
from .study import Study

TRACED = 4  # trajectories per step whose per-position drift and gates are logged
LOCALITY_BLOCK = 16  # tokens (about one solution line) for the top-10% share
ARM_COLUMNS = ("greedy", "pass1", "pass8", "drift_top10_share", "drift_late_excess")  # the report's per-arm means


@dataclass(frozen=True)
class Arm:
    """One configuration: the horizon (items), the loss, the gate ("none", "block<B>", "newline"), tau, whether the
    gates are mean-normalized, and the reuse schedule (``updates`` optimizer updates per rollout batch)."""

    horizon: int
    loss: str = "sampled_token"
    gate: str = "none"
    tau: float = 1.0
    normalize: bool = True
    updates: int = 8
    lr: float = 1e-4
    adv_clip: float = 1.0

    @property
    def name(self) -> str:
        raw = "" if self.normalize else "-raw"
        return (f"h{self.horizon}-{self.loss}-{self.gate}-tau{self.tau:g}{raw}-u{self.updates}-lr{self.lr:g}"
                f"-adv{self.adv_clip:g}")

    @property
    def label(self) -> str:
        loss = {"sampled_token": "sampled-token", "topk_lsm": "LSM", "sft": "control: SFT on teacher"}[self.loss]
        gate = {"none": "", "newline": " + NewlineSpan"}.get(self.gate, f" + {self.gate.capitalize()}")
        tau = "" if self.tau == 1 else f" tau {self.tau:g}"
        return f"{loss}{gate}{tau}{'' if self.normalize else ' (raw)'}"

    def gate_section(self) -> dict:
        extra = {"tau": self.tau, **({} if self.normalize else {"normalize": False})}
        if self.gate == "none" or self.loss == "sft":
            return {"granularity": "none"}
        if self.gate == "newline":
            return {"granularity": "span", **extra}
        return {"granularity": "block", "block_size": int(self.gate[5:]), **extra}

    def schedule(self) -> dict:
        """epochs x minibatches = updates (2 mini-batches per epoch, or 1 for a single update)."""
        return {"epochs": max(1, self.updates // 2), "minibatches": 1 if self.updates == 1 else 2}

    def reference(self) -> "Arm | None":
        """The arm this one is compared with seed by seed: ungated sampled-token OPD with the same everything else
        (for the SFT control too); None for that arm itself."""
        if self.loss != "sft" and self.gate == "none" and self.normalize and self.tau == 1:
            return None
        return replace(self, gate="none", tau=1.0, normalize=True, loss="sampled_token" if self.loss == "sft"
                       else self.loss)


def premise_arms(args) -> list:
    return [Arm(h, updates=u, lr=lr) for lr in args.lr for h in args.horizons for u in sorted({1, args.updates})]


GATE_ARMS = ("block16", "block64", "block256", "newline", "tau", "raw", "sft")


def gate_arms(args) -> list:
    """At the long horizon and each ``--gate-lr`` (default ``--lr``): no gate and the ``--gates`` arms."""
    out = []
    for lr in args.gate_lr or args.lr:
        base = Arm(max(args.horizons), updates=args.updates, lr=lr)
        arms = {"block16": [replace(base, gate="block16")], "block64": [replace(base, gate="block64")],
                "block256": [replace(base, gate="block256")], "newline": [replace(base, gate="newline")],
                "tau": [replace(base, gate="block64", tau=t) for t in args.taus],
                "raw": [replace(base, gate="block64", normalize=False)], "sft": [replace(base, loss="sft")]}
        out += [base, *(arm for name in args.gates for arm in arms[name])]
    return out


SECTIONS = {"premise": premise_arms, "gate": gate_arms}


class LongHorizon(Study):
    name = "long_horizon"
    task = "running_sum"
    eval_samples = 8  # pass@8, the paper's primary metric (unbiased estimator)

    def arguments(self, parser):
        parser.add_argument("--section", nargs="+", choices=list(SECTIONS), default=["premise"])
        parser.add_argument("--horizons", type=int, nargs="+", default=[4, 12, 22], help="items per problem")
        parser.add_argument("--updates", type=int, default=8, help="optimizer updates per rollout (reuse)")
        parser.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="learning rates (each a set of arms)")
        parser.add_argument("--gate-lr", type=float, nargs="+", help="the gate section's lrs (default --lr)")
        parser.add_argument("--gates", nargs="+", choices=GATE_ARMS, default=list(GATE_ARMS),
                            help="the gate section's arms beside no gate (tau: Block64 at each --taus)")
        parser.add_argument("--taus", type=float, nargs="*", default=[],
                            help="extra Block64 tau values (matched to the measured drift: tau x |D| ~ 0.3-1)")
        parser.add_argument("--split", choices=("dev", "test"), default="dev",
                            help="evaluation split: dev for every choice, test for the report")

    def arms(self, args) -> list:
        out = []
        for section in args.section:
            out += [arm for arm in SECTIONS[section](args) if arm not in out]
        if args.quick:
            out = [replace(arm, horizon=min(args.horizons)) for arm in out[:1]]
        return out

    def plan(self, args):
        return [(arm, seed) for seed in args.seeds for arm in self.arms(args)]  # seed by seed: partial runs pair

    def run_name(self, arm):
        return arm.name

    def prompt_files(self, arm, data_dir, args):
        return task_prompts(data_dir / f"h{arm.horizon}-{args.split}", args.eval_problems, task=self.task,
                            eval_split=args.split, horizon=arm.horizon)

    def configure(self, arm, base, args):
        return base.replace(loss=arm.loss, gate=arm.gate_section(), lr=arm.lr, **arm.schedule(),
                            overrides={"loss.adv_clip": arm.adv_clip, "gate_trace": TRACED})

    def summarize(self, runs, missing, args):
        newline = newline_ids(self.task)
        rows = [row(arm, seed, run, args, newline) for (arm, seed), run in runs.items()]
        arms = self.arms(args)
        table = {arm.name: {key: mean_std([r[key] for r in rows if r["config"] == arm.name])
                            for key in (*ARM_COLUMNS, "gate_min", "seconds")} for arm in arms}
        return {"runs": rows, "table": table, "comparisons": comparisons(rows, arms),
                "meta": {"command": args.command, "split": args.split, "steps": args.steps, "seeds": args.seeds,
                         "missing_runs": missing}}

    def plot(self, summary, runs, args):
        plot_premise(summary, args.out / "premise.png")
        plot_drift(summary, runs, args.out / "drift.png")

    def report(self, summary, runs, args):
        return report(summary, self.arms(args), args)


def newline_ids(task: str) -> list:
    """The newline token ids of ``task``'s tokenizer (the one its shipped models carry)."""
    from megatron_bpd.tasks.models import task_tokenizer
    from megatron_bpd.train.rollout_data import newline_token_ids

    return newline_token_ids(task_tokenizer(task=task))


def row(arm: Arm, seed: int, run: dict, args, newline: list) -> dict:
    """The results.json row of one run: held-out numbers before and after, the gate statistics over all steps, and
    how local the traced drift is (updates after the first of each rollout: the first sees no drift)."""
    before, after = run["evals"][0], run["evals"][-1]
    metrics = run["metrics"]
    series = lambda key: [m[key] for m in metrics if key in m]  # noqa: E731
    trace = [json.loads(line) for line in run["files"].get("gate_trace.jsonl", "").splitlines()]
    drifting = [t for t in trace if (t["epoch"], t["minibatch"]) != (0, 0)]  # the first: float rounding only
    locality = drift_locality.locality(drifting, LOCALITY_BLOCK)
    lengths = series("response_length")
    return {
        "task": "running_sum", "horizon": arm.horizon, "arm": arm.label, "config": arm.name, "loss": arm.loss,
        "granularity": arm.gate_section()["granularity"], "block_size": arm.gate_section().get("block_size"),
        "tau": arm.tau, "normalize": arm.normalize, "updates_per_rollout": arm.updates, "lr": arm.lr, "seed": seed,
        "split": args.split, "n_eval": after["student"]["n"],
        "greedy": after["student"]["greedy"], "pass1": after["student"]["pass1"],
        "pass8": after["student"].get("pass8"),
        "greedy_before": before["student"]["greedy"], "pass1_before": before["student"]["pass1"],
        "pass8_before": before["student"].get("pass8"), "teacher": before.get("teacher"),
        "response_tokens_median": statistics.median(lengths) if lengths else None,
        "drift_abs_mean": statistics.fmean(series("drift_abs_mean")) if series("drift_abs_mean") else None,
        "drift_top10_share": locality["top_share"], "drift_top10_null": locality["null_share"],
        "drift_late_share": locality["late_share"], "drift_late_excess": locality["late_excess"],
        "drift_by_line": drift_locality.drift_by_line(drifting, newline) if drifting and "response_ids" in
        drifting[0] else None,
        "gate_min": min(series("gate_min"), default=None), "gate_std": statistics.fmean(series("gate_std"))
        if series("gate_std") else None,
        "curve": [{"step": e["step"], "greedy": e["student"]["greedy"], "pass1": e["student"]["pass1"],
                   "pass8": e["student"].get("pass8")} for e in run["evals"]],
        "seconds": run["seconds"],
    }


def comparisons(rows: list, arms: list) -> dict:
    """Each arm with a reference minus that reference, paired by seed, for pass@8 / pass@1 / greedy: the mean, its
    95% t interval, the design's minimum detectable effect, and the seeds +0.02 would need at this spread."""
    out = {}
    by = lambda arm, key: {r["seed"]: r[key] for r in rows if r["config"] == arm.name}  # noqa: E731
    for arm in arms:
        ref = arm.reference()
        if ref is None:
            continue
        out[arm.name] = {"label": arm.label, "reference": ref.name, "horizon": arm.horizon, "lr": arm.lr}
        for key in ("pass8", "pass1", "greedy"):
            pair = paired(by(arm, key), by(ref, key))
            summary = paired_summary(pair["diffs"] if pair else [])
            summary["seeds_for_0.02"] = seeds_for(0.02, summary["sd"]) if summary["sd"] else None
            out[arm.name][key] = summary
    return out


def premise_gains(rows: list) -> dict:
    """{(horizon, lr, updates): mean_std of pass@1 after - before} for ungated sampled-token runs."""
    groups: dict = {}
    for r in _ungated(rows):
        groups.setdefault((r["horizon"], r["lr"], r["updates_per_rollout"]), []).append(r["pass1"] - r["pass1_before"])
    return {key: mean_std(values) for key, values in sorted(groups.items())}


def reuse_effects(rows: list) -> dict:
    """{(horizon, lr, updates): paired_summary of pass@1 with ``updates`` > 1 updates per rollout minus with 1,
    by seed} for ungated sampled-token runs: does reuse help or hurt at this horizon and learning rate?"""
    by = lambda h, lr, u: {r["seed"]: r["pass1"] for r in _ungated(rows)  # noqa: E731
                           if (r["horizon"], r["lr"], r["updates_per_rollout"]) == (h, lr, u)}
    out = {}
    for h, lr, u in sorted({(r["horizon"], r["lr"], r["updates_per_rollout"]) for r in _ungated(rows)}):
        pair = paired(by(h, lr, u), by(h, lr, 1)) if u > 1 else None
        if pair:
            out[(h, lr, u)] = paired_summary(pair["diffs"])
    return out


def _ungated(rows: list) -> list:
    return [r for r in rows if r["loss"] == "sampled_token" and r["granularity"] == "none"]


def plot_premise(summary: dict, path) -> None:
    """pass@1 gain of ungated sampled-token OPD by horizon, one line per learning rate and reuse schedule; with one
    horizon, by learning rate, one line per reuse schedule (mean ± sd over seeds)."""
    gains = premise_gains(summary["runs"])
    if not gains:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_horizon = len({h for h, _, _ in gains}) > 1  # else: the gain against the learning rate
    fig, ax = plt.subplots(figsize=(6, 4))
    for line, updates in sorted({(lr if by_horizon else h, u) for h, lr, u in gains}):
        points = sorted((h if by_horizon else lr, g) for (h, lr, u), g in gains.items()
                        if ((lr if by_horizon else h), u) == (line, updates))
        ax.errorbar([x for x, _ in points], [g["mean"] for _, g in points], [g["std"] or 0 for _, g in points],
                    marker="o", capsize=3,
                    label=f"{f'lr {line:g}' if by_horizon else f'{line} items'}, {updates} update(s) per rollout")
    ax.axhline(0, color="gray", linewidth=0.8)
    if by_horizon:
        ax.set(xlabel="horizon (items per problem)", title="OPD gain by horizon")
    else:
        ax.set(xlabel="learning rate", xscale="log", title="OPD gain by learning rate")
    ax.set(ylabel="held-out pass@1 gain (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drift(summary: dict, runs: dict, path) -> None:
    """Where the drift sits: mean |drift| per token by solution line for every arm with reuse (mean over seeds),
    and |drift| along the traced responses of the first such run's last step (a row per response and update)."""
    by_line = {}
    for r in summary["runs"]:
        if r["drift_by_line"]:
            by_line.setdefault((r["arm"], r["lr"], r["updates_per_rollout"]), []).append(r["drift_by_line"])
    if not by_line:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (arm, lr, updates), curves in sorted(by_line.items()):
        lines = min(len(c) for c in curves)
        left.plot(range(lines), [statistics.fmean(c[i] for c in curves) for i in range(lines)], marker=".",
                  label=f"{arm}, lr {lr:g}, {updates} updates ({len(curves)} seeds)")
    left.set(xlabel="solution line", ylabel="mean |drift| per token (nats)", yscale="log",
             title="drift by line (updates after a rollout's first)")
    left.legend(fontsize=7)
    (arm, seed), run = next((key, run) for key, run in runs.items() if key[0].updates > 1)
    trace = [json.loads(line) for line in run["files"].get("gate_trace.jsonl", "").splitlines()]
    step = max(t["step"] for t in trace)
    rows = [t for t in trace if t["step"] == step and (t["epoch"], t["minibatch"]) != (0, 0)]
    width = max(len(t["drift"]) for t in rows)
    grid = [[max(abs(d), 1e-5) for d in t["drift"]] + [float("nan")] * (width - len(t["drift"])) for t in rows]
    image = right.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest",
                         norm=matplotlib.colors.LogNorm(vmin=1e-4, vmax=max(max(g) for g in grid)))
    fig.colorbar(image, ax=right, label="|drift| (nats, log)")
    right.set(xlabel="response position", ylabel="traced response x update",
              title=f"{arm.label}, lr {arm.lr:g}, seed {seed}: step {step}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict, arms: list, args) -> str:
    rows, table = summary["runs"], summary["table"]
    arm_rows = "\n".join(
        f"| {a.label} | {a.horizon} | {a.lr:g} | {a.updates} | {table[a.name]['greedy']['n']} | "
        + " | ".join("-" if table[a.name][k]["mean"] is None else f"{table[a.name][k]['mean']:.3f} ± "
                     f"{table[a.name][k]['std']:.3f}" for k in ARM_COLUMNS)
        + " |" for a in arms if table[a.name]["greedy"]["n"])
    versus = "\n".join(f"| {c['label']} (h{c['horizon']}, lr {c['lr']:g}) | "
                       + " | ".join(format_paired(c[k]) for k in ("pass8", "pass1", "greedy"))
                       + f" | {c['pass8'].get('seeds_for_0.02') or '-'} |" for c in summary["comparisons"].values())
    reuse = reuse_effects(rows)
    gains = "\n".join(f"| {h} | {lr:g} | {u} | {g['n']} | {g['mean']:+.3f} ± {g['std']:.3f} | "
                      f"{format_paired(reuse[(h, lr, u)]) if (h, lr, u) in reuse else '-'} |"
                      for (h, lr, u), g in premise_gains(rows).items())
    missing = summary["meta"]["missing_runs"]
    return f"""# The gate at a long horizon (issue 22): results

Made by:

    {args.command}

Task: running sums (`tasks/running_sum.py`), evaluated on the `{args.split}` split at each run's horizon;
{args.steps} steps of 64 prompts x 1 sample; pass@k from {args.eval_samples} samples at T = 1 with top-p 0.9.
{'**Not finished:** ' + str(len(missing)) + ' planned runs missing.' if missing else 'Every planned run is in.'}

## Each arm (mean ± sd over seeds)

Drift locality from the traced responses (``drift_locality``): the share of |drift| in a response's top 10% of
16-token blocks (its permuted null is close to it when a few heavy tokens carry the drift), and the share in its
last quarter of positions minus that quarter's share of positions ("late excess": 0 when drift does not depend on
position).

| arm | horizon | lr | updates/rollout | seeds | greedy | pass@1 | pass@8 | drift: top-10% block share | late excess |
|---|---|---|---|---|---|---|---|---|---|
{arm_rows}

## Paired against no gate (same seeds), 95% t interval and minimum detectable effect

| arm | pass@8 | pass@1 | greedy | seeds for +0.02 (pass@8) |
|---|---|---|---|---|
{versus or '| - | - | - | - | - |'}

## The premise: OPD's pass@1 gain by horizon, learning rate and reuse

The gain is pass@1 after minus before (mean ± sd over seeds); "against 1 update" is pass@1 with this many updates
per rollout minus with one, paired by seed (95% t interval, minimum detectable effect).

| horizon | lr | updates/rollout | seeds | gain | against 1 update |
|---|---|---|---|---|---|
{gains or '| - | - | - | - | - | - |'}

![premise](premise.png)

## Where the drift sits

![drift](drift.png)
"""


if __name__ == "__main__":
    LongHorizon().main()
