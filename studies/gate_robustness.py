"""Evidence for the gate where it can matter (issue 11): the paper's six variants, rollout reuse, staleness, block
size and tau, on the regime where on-policy distillation lifts the student (docs/results/opd_regime.md).

    python -m studies.gate_robustness --out docs/results/gate_robustness [--sweeps variants reuse ...] [--seeds 0 1 2]
    python -m studies.gate_robustness --quick --out runs/gate_quick      # smoke test (< 3 min), never into docs/

A run is the trainer (``experiment.launch``: torchrun, embedded SGLang-protocol servers) with the shipped teacher
and student on the addition task; every number is the trainer's own held-out evaluation (greedy accuracy, pass@1
and pass@8 at T=1 / top-p 0.9) and its per-step gate statistics. Each run also traces the per-position drift and
gates of 4 trajectories per step (``gate_trace``), which the report draws as a heatmap and as drift by block index.

A sweep is a list of configurations (``SWEEPS``); a configuration shared by several sweeps runs once. The runs are
kept in ``OUT/runs.tar.xz`` (``<config>/seed<k>/``), so an interrupted or extended sweep continues where it
stopped. Writes ``OUT/results.json`` (one row per run: variant, loss, granularity, block_size, reuse_epochs,
minibatches, lr, tau, staleness, seed, greedy, pass1, pass8, drift_abs_mean, gate_min, gate_std, ...),
``OUT/report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

from megatron_bpd.experiment import mean_std, paired

from .study import Study

BLOCK = 16  # tokens: the task's responses are ~40-80 tokens (one ~12-token line per digit column + answer lines)
SPAN = {"span_min_len": 4, "span_max_len": 64, "span_fallback_block": BLOCK}
TRACED = 4  # trajectories per step whose per-position drift and gates are logged
LOSS_LABELS = {"sampled_token": "sampled-token OPD", "topk_lsm": "Teacher-TopK/LSM", "sft": "control: SFT on teacher"}


@dataclass(frozen=True)
class Config:
    """One configuration of a sweep: the loss, the gate (``gate``: "none", "token", "block<B>", "sequence",
    "newline"), tau, the reuse schedule (epochs x minibatches optimizer updates per rollout batch), lr, staleness."""

    loss: str = "sampled_token"
    gate: str = "none"
    tau: float = 1.0
    epochs: int = 1
    minibatches: int = 2
    lr: float = 3e-4
    staleness: int = 0
    adv_clip: float = 5.0  # the sampled-token loss's advantage clamp (loss.adv_clip)
    normalize: bool = True  # gate.normalize: False keeps the raw gates (<= 1), so drift shrinks the update
    dual_clip: float | None = None  # loss.dual_clip: dual-clip PPO's c (None: off)
    proximal: bool = False  # under staleness, pi_old = the weights before the step (reuse.old_logprobs "recompute")
    behavior_cap: float | None = None  # with proximal: decoupled PPO's pi_old / pi_behavior weight, truncated here

    @property
    def name(self) -> str:
        adv = "" if self.adv_clip == Config.adv_clip else f"-adv{self.adv_clip:g}"
        raw = "" if self.normalize else "-raw"
        dual = "" if self.dual_clip is None else f"-dual{self.dual_clip:g}"
        prox = ("-prox" if self.proximal else "") + ("" if self.behavior_cap is None else f"-bw{self.behavior_cap:g}")
        return (f"{self.loss}-{self.gate}-tau{self.tau:g}-e{self.epochs}m{self.minibatches}-lr{self.lr:g}"
                f"-k{self.staleness}{adv}{raw}{dual}{prox}")

    @property
    def label(self) -> str:
        gate = {"none": "", "newline": " + NewlineSpan"}.get(self.gate, f" + {self.gate.capitalize()}")
        adv = "" if self.adv_clip == Config.adv_clip else f", advantage clamp {self.adv_clip:g}"
        raw = "" if self.normalize else " (not normalized)"
        dual = "" if self.dual_clip is None else f", dual clip {self.dual_clip:g}"
        prox = (", proximal pi_old" if self.proximal else "") + \
            ("" if self.behavior_cap is None else f", behavior weight cap {self.behavior_cap:g}")
        return LOSS_LABELS[self.loss] + gate + raw + adv + dual + prox

    def gate_section(self) -> dict:
        """The trainer's ``loss.gate`` section."""
        raw = {} if self.normalize else {"normalize": False}
        if self.gate == "newline":
            return {"granularity": "span", "tau": self.tau, **SPAN, **raw}
        if self.gate.startswith("block"):
            return {"granularity": "block", "block_size": int(self.gate[5:]), "tau": self.tau, **raw}
        return {"granularity": self.gate, "tau": self.tau, **raw}

    def settings(self) -> dict:
        """The trainer settings ("section.key": value, ``experiment.TaskRun.overrides``) of the schedule, the
        staleness and the loss options; pi_old is the sampler's under staleness unless ``proximal``."""
        return {"optimizer.lr": self.lr, "reuse.epochs": self.epochs, "reuse.minibatches": self.minibatches,
                "rollout.max_staleness": self.staleness,
                "reuse.old_logprobs": "rollout" if self.staleness and not self.proximal else "recompute",
                "loss.adv_clip": self.adv_clip, "loss.dual_clip": self.dual_clip, "gate_trace": TRACED,
                **({} if self.behavior_cap is None else
                   {"loss.drift_control": {"kind": "tis", "cap": self.behavior_cap}})}

    def granularity(self) -> tuple:
        """(granularity, block size or None) as in results.json."""
        section = self.gate_section()
        return section["granularity"], section.get("block_size")

    @property
    def updates(self) -> int:
        return self.epochs * self.minibatches


BASE = Config()
HEAVY = replace(BASE, epochs=2, minibatches=4)  # 8 updates per rollout batch: where drift has room to grow
# where both losses lift the student by > 0.2 in 40 steps (docs/results/opd_regime.md): 8 updates per rollout at
# lr 1e-4, and the sampled-token loss with advantage clamp 1 (LSM and SFT have no advantage)
WORKING = replace(HEAVY, lr=1e-4)
SWEEPS = {
    "variants": [replace(BASE, loss=loss, gate=gate) for loss in ("sampled_token", "topk_lsm")
                 for gate in ("none", f"block{BLOCK}", "newline")] + [replace(BASE, loss="sft")],
    "reuse": [replace(BASE, gate=gate, epochs=e, minibatches=m, lr=lr) for gate in ("none", f"block{BLOCK}")
              for e, m, lr in ((1, 1, 3e-4), (1, 2, 3e-4), (2, 2, 3e-4), (2, 4, 3e-4), (2, 4, 1e-4), (2, 4, 1e-3))],
    "staleness": [replace(BASE, gate=gate, staleness=k) for gate in ("none", f"block{BLOCK}") for k in (0, 1, 2, 4)]
    + [replace(BASE, gate=f"block{BLOCK}", staleness=4, normalize=False),  # raw gates: can drift shrink the step?
       replace(BASE, staleness=4, dual_clip=3.0),  # or is it PPO's unbounded push-down of stale negatives?
       # or the advantage lp_teach - lp_old with a k-versions-old lp_old, lagging the student (delayed feedback)?
       replace(BASE, staleness=2, proximal=True), replace(BASE, staleness=4, proximal=True),
       # and the stale samples themselves: decoupled PPO, each sample weighted by pi_old / pi_behavior (cap 2)
       replace(BASE, staleness=4, proximal=True, behavior_cap=2.0)],
    "block": [replace(HEAVY, gate=gate) for gate in ("none", "token", "block4", "block8", "block16", "block32",
                                                     "block64", "sequence", "newline")],
    "tau": [replace(HEAVY, gate=f"block{BLOCK}", tau=tau) for tau in (0.5, 1.0, 2.0, 4.0)],
    # issue 10's probe: a smaller advantage clamp at the best sampled-token schedule (a wrong token's advantage is
    # the clamp, -5, against ~+0.1 on right ones); compared with the default clamp, not with a gate
    "advantage": [replace(HEAVY, lr=1e-4, adv_clip=clip) for clip in (5.0, 1.0)]
    + [replace(HEAVY, lr=1e-4, loss="sft")],  # the control at the same schedule: SFT on teacher samples
    # the paper's six variants and the control in the working regime (run with --steps 40, into its own --out)
    "working": [replace(WORKING, loss=loss, gate=gate, adv_clip=1.0 if loss == "sampled_token" else Config.adv_clip)
                for loss in ("sampled_token", "topk_lsm") for gate in ("none", f"block{BLOCK}", "newline")]
    + [replace(WORKING, loss="sft")],
}
QUICK = [replace(BASE, gate=f"block{BLOCK}", staleness=1), replace(BASE, loss="topk_lsm", gate="newline")]


class GateRobustness(Study):
    """The configurations of the chosen sweeps (``--sweeps``; ``QUICK`` for ``--quick``) at every seed."""

    name = "gate_robustness"
    eval_every = 10
    eval_samples = 8

    def arguments(self, parser):
        parser.add_argument("--sweeps", nargs="+", choices=list(SWEEPS), default=list(SWEEPS))

    def sweeps(self, args) -> dict:
        """The chosen sweeps by name; ``--quick``: ``QUICK`` alone."""
        return {"quick": QUICK} if args.quick else {name: SWEEPS[name] for name in args.sweeps}

    def plan(self, args):
        configs = list(dict.fromkeys(c for cs in self.sweeps(args).values() for c in cs))
        return [(config, seed) for seed in args.seeds for config in configs]  # seed by seed: partial sweeps pair

    def run_name(self, config):
        return config.name

    def configure(self, config, base, args):
        return base.replace(loss=config.loss, gate=config.gate_section(), overrides=config.settings())

    def summarize(self, runs, missing, args):
        sweeps = self.sweeps(args)
        summary = summarize(runs, sweeps, args.eval_samples)
        summary["meta"] = {"command": args.command, "steps": args.steps, "seeds": args.seeds, "missing_runs": missing,
                           "sweeps": {name: [asdict(c) | {"name": c.name} for c in cs] for name, cs in sweeps.items()}}
        return summary

    def plot(self, summary, runs, args):
        sweeps = self.sweeps(args)
        plot_sweeps(summary, runs, sweeps, args.eval_samples, args.out)
        plot_gate_effect(summary, sweeps, args.out)
        for name, (traced, seed) in traced_runs(runs).items():
            plot_trace(runs[(traced, seed)], f"{traced.label}, {traced.epochs} x {traced.minibatches} updates, "
                       f"lr {traced.lr:g}, seed {seed}", args.out / name)

    def report(self, summary, runs, args):
        return report(summary, runs, self.sweeps(args), args, args.command, args.eval_samples)


def row(config: Config, seed: int, run: dict, samples: int) -> dict:
    """The results.json row of one run: final held-out numbers and the gate statistics over all steps."""
    before, after = run["evals"][0], run["evals"][-1]
    metrics = run["metrics"]
    series = lambda key: [m[key] for m in metrics if key in m]  # noqa: E731
    behavior_drift = series("behavior_drift_abs_mean")
    behavior_weight = series("drift_weight_mean") or series("behavior_weight_mean")  # the name before drift_control
    granularity, block = config.granularity()
    return {
        "variant": config.label, "config": config.name, "loss": config.loss, "granularity": granularity,
        "block_size": block, "tau": config.tau, "reuse_epochs": config.epochs, "minibatches": config.minibatches,
        "updates": config.updates, "lr": config.lr, "staleness": config.staleness, "adv_clip": config.adv_clip,
        "normalize": config.normalize, "dual_clip": config.dual_clip, "proximal": config.proximal,
        "behavior_cap": config.behavior_cap, "seed": seed,
        "greedy": after["student"]["greedy"], "pass1": after["student"]["pass1"],
        f"pass{samples}": after["student"].get(f"pass{samples}"),
        "greedy_before": before["student"]["greedy"], "pass1_before": before["student"]["pass1"],
        f"pass{samples}_before": before["student"].get(f"pass{samples}"),
        "teacher": before.get("teacher"), "support_kl": after.get("support_kl"),
        "drift_abs_mean": float(np.mean(series("drift_abs_mean"))),
        "drift_abs_max_step": float(np.max(series("drift_abs_mean"))),
        # with a proximal pi_old under staleness: the drift since sampling, which drift_abs_mean then does not hold
        "behavior_drift_abs_mean": float(np.mean(behavior_drift)) if behavior_drift else None,
        "behavior_weight_mean": float(np.mean(behavior_weight)) if behavior_weight else None,
        "gate_min": float(np.min(series("gate_min"))), "gate_std": float(np.mean(series("gate_std"))),
        "curve": [{"step": e["step"], "greedy": e["student"]["greedy"], "pass1": e["student"]["pass1"]}
                  for e in run["evals"]],
        "seconds": run["seconds"],
    }


def summarize(runs: dict, sweeps: dict, samples: int) -> dict:
    rows = [row(config, seed, run, samples) for (config, seed), run in runs.items()]
    table = {}
    for config in dict.fromkeys(c for configs in sweeps.values() for c in configs):  # sweep order, once each
        mine = [r for r in rows if r["config"] == config.name]
        table[config.name] = {key: mean_std([r[key] for r in mine]) for key in
                              ("greedy", "pass1", f"pass{samples}", "drift_abs_mean", "gate_min", "gate_std")}
    return {"runs": rows, "table": table}


def per_seed(rows, config: Config, key: str) -> dict:
    return {r["seed"]: r[key] for r in rows if r["config"] == config.name}


def reference(config: Config) -> Config | None:
    """What a configuration is compared with, seed by seed: a gated one with the same configuration ungated; an
    ungated one with dual clipping, a proximal pi_old or another advantage clamp with the same configuration
    without (the defaults), and a decoupled one (the behavior weight) with the same proximal run without the weight;
    None for the rest."""
    if config.gate != "none" and config.loss != "sft":
        return replace(config, gate="none", tau=1.0, normalize=True)
    if config.dual_clip is not None:
        return replace(config, dual_clip=None)
    if config.behavior_cap is not None:
        return replace(config, behavior_cap=None)
    if config.proximal:
        return replace(config, proximal=False)
    if config.adv_clip != Config.adv_clip:
        return replace(config, adv_clip=Config.adv_clip)
    return None


def versus_reference(rows, config: Config) -> dict | None:
    """pass@1 of ``config`` minus its ``reference``, paired by seed (``paired``); None without a reference or a
    common seed."""
    ref = reference(config)
    return paired(per_seed(rows, config, "pass1"), per_seed(rows, ref, "pass1")) if ref is not None else None


def sweep_table(name: str, configs, summary: dict, samples: int) -> str:
    """Mean ± std per configuration, and the paired per-seed difference to its ``reference``."""
    t, rows = summary["table"], summary["runs"]
    head = (f"| configuration | updates/rollout | lr | k | seeds | greedy | pass@1 | pass@{samples} | |drift| | "
            f"gate min | gate std | minus reference: pass@1 (per seed) |\n|" + "---|" * 12)
    lines = [head]
    fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    gate_diffs = {}  # seed -> the paired differences of the gated configurations
    for c in configs:
        row_t = t[c.name]
        diff = "-"
        p = versus_reference(rows, c)
        if p:
            diff = f"{p['mean']:+.3f} ± {p['std']:.3f} ({', '.join(f'{d:+.2f}' for d in p['diffs'])})"
            if c.gate != "none":
                for seed, d in zip(p["seeds"], p["diffs"]):
                    gate_diffs.setdefault(seed, []).append(d)
        tau = f", tau {c.tau:g}" if name == "tau" else ""
        lines.append(f"| {c.label}{tau} | {c.epochs} x {c.minibatches} | {c.lr:g} | {c.staleness} | "
                     f"{row_t['greedy']['n']} | {fmt(row_t['greedy'])} | {fmt(row_t['pass1'])} | "
                     f"{fmt(row_t[f'pass{samples}'])} | {fmt(row_t['drift_abs_mean'])} | {fmt(row_t['gate_min'])} | "
                     f"{fmt(row_t['gate_std'])} | {diff} |")
    pooled = {seed: float(np.mean(d)) for seed, d in sorted(gate_diffs.items())}
    if len(pooled) > 1 and max(map(len, gate_diffs.values())) > 1:
        p = mean_std(list(pooled.values()))
        lines.append(f"\nPooled, the gated configurations' mean difference per seed: {p['mean']:+.3f} ± {p['std']:.3f} "
                     f"({', '.join(f'seed {s}: {d:+.3f}' for s, d in pooled.items())}).")
    return "\n".join(lines)


def read_trace(run: dict) -> list:
    """The gate trace of an archived run (``RunArchive.read``): one record per traced trajectory and update."""
    return [json.loads(line) for line in run["files"].get("gate_trace.jsonl", "").splitlines()]


def last_update(trace: list) -> list:
    """The records of each step's last update (most drift: the furthest from the behavior policy)."""
    last = {}
    for r in trace:
        last[r["step"]] = max(last.get(r["step"], (0, 0)), (r["epoch"], r["minibatch"]))
    return [r for r in trace if (r["epoch"], r["minibatch"]) == last[r["step"]]]


def drift_by_block(trace: list, block: int = BLOCK) -> np.ndarray:
    """Mean |block-mean drift| by block index along the response (B = ``block``), over the traced trajectories of
    each step's last update: ``[blocks]``."""
    sums, counts = {}, {}
    for r in last_update(trace):
        drift = np.asarray(r["drift"])
        for i in range(0, len(drift), block):
            sums[i // block] = sums.get(i // block, 0.0) + abs(drift[i:i + block].mean())
            counts[i // block] = counts.get(i // block, 0) + 1
    return np.array([sums[i] / counts[i] for i in sorted(sums)])


def plot_trace(run: dict, title: str, path) -> None:
    """Heatmaps (response position x step) of |drift| and of the gates at each step's last update (mean over the
    traced trajectories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = last_update(read_trace(run))
    steps = sorted({r["step"] for r in trace})
    width = max(len(r["drift"]) for r in trace)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax, key, cmap in ((axes[0], "drift", "magma"), (axes[1], "gate", "viridis")):
        grid = np.full((len(steps), width), np.nan)
        for i, step in enumerate(steps):
            mine = [np.abs(r[key]) if key == "drift" else np.asarray(r[key]) for r in trace if r["step"] == step]
            padded = np.full((len(mine), width), np.nan)
            for j, values in enumerate(mine):
                padded[j, :len(values)] = values
            with warnings.catch_warnings():  # positions past every traced response stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                grid[i] = np.nanmean(padded, axis=0)
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap=cmap, interpolation="nearest")
        ax.set(xlabel="response position", ylabel="step", title=("|drift|" if key == "drift" else "gate") +
               f" at each step's last update ({TRACED} trajectories)")
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def traced_runs(runs: dict) -> dict:
    """The runs whose gate trace the report draws: {file name: (config, seed)}, among the runs with a trace the
    gated sampled-token run (else any run) with the most updates per rollout at its lowest lr ("gate_trace.png")
    and, when another, at its highest ("gate_trace_high_lr.png"); the lowest seed. {} when no run has a trace."""
    runs = {key: run for key, run in runs.items() if "gate_trace.jsonl" in run["files"]}
    if not runs:
        return {}

    def rank(key):
        config, seed = key
        return (config.loss == "sampled_token" and config.gate != "none", config.updates, config.staleness == 0, -seed)
    best = max(rank(key)[:3] for key in runs)
    candidates = sorted((key for key in runs if rank(key)[:3] == best), key=lambda key: (key[0].lr, key[1]))
    low = candidates[0]
    high = max(candidates, key=lambda key: (key[0].lr, -key[1]))
    return {"gate_trace.png": low} | ({"gate_trace_high_lr.png": high} if high[0].lr != low[0].lr else {})


def plot_sweeps(summary: dict, runs: dict, sweeps: dict, samples: int, out) -> None:
    """sweeps.png (pass@1 per configuration of each sweep, seeds as dots) and drift_by_block.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["runs"]
    widths = [max(3.0, 0.55 * len(configs)) for configs in sweeps.values()]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(sum(widths) + 1, 5.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (name, configs) in zip(axes[0], sweeps.items()):
        for x, c in enumerate(configs):
            values = list(per_seed(rows, c, "pass1").values())
            ax.scatter([x] * len(values), values, s=14, color="gray")
            if values:
                ax.errorbar(x, np.mean(values), yerr=np.std(values, ddof=1) if len(values) > 1 else 0, fmt="o",
                            color="C0" if c.gate == "none" else "C1", capsize=3)
        ax.axhline(rows[0]["pass1_before"], color="gray", linestyle=":", label="base student")
        labels = [f"{c.loss.replace('sampled_token', 'st').replace('topk_lsm', 'lsm')} {c.gate} "
                  f"{c.epochs}x{c.minibatches} lr{c.lr:g} k{c.staleness} tau{c.tau:g}" for c in configs]
        ax.set_xticks(range(len(configs)), labels, fontsize=7, rotation=90)
        ax.set(title=f"{name}: held-out pass@1", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweeps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    # ungated sampled-token runs without staleness; a sweep whose ungated runs carry no trace (the working sweep
    # shares them with studies/opd_regime.py) shows its Block16 runs instead
    synchronous = {c for name in ("reuse", "variants", "block", "working") for c in sweeps.get(name, [])
                   if c.loss == "sampled_token" and c.staleness == 0 and c.gate in ("none", f"block{BLOCK}")}
    for gate in ("none", f"block{BLOCK}"):
        for c in sorted((c for c in synchronous if c.gate == gate), key=lambda c: (c.updates, c.lr)):
            curves = [drift_by_block(read_trace(runs[(c, s)])) for (cc, s) in runs if cc == c]
            curves = [v for v in curves if len(v) and np.max(v) > 0]  # one update per rollout: no drift to draw
            if curves:
                n = min(map(len, curves))
                ax.plot(range(n), np.mean([v[:n] for v in curves], axis=0), marker="o",
                        label=f"{c.epochs} x {c.minibatches} updates, lr {c.lr:g}")
        if ax.lines:
            break
    ax.set(xlabel=f"block index along the response (B = {BLOCK})", ylabel="mean |block drift| (nats/token)",
           title=f"drift by position in the response (sampled-token OPD, {'no gate' if gate == 'none' else gate})")
    if ax.lines:
        ax.set_yscale("log")  # drift spans orders of magnitude between a helpful and a collapsing lr
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "drift_by_block.png", dpi=110)
    plt.close(fig)


def plot_gate_effect(summary: dict, sweeps: dict, out) -> None:
    """gate_effect.png: per sweep, each gated configuration's pass@1 minus the same configuration without a gate,
    paired by seed (dots: seeds; bar: mean ± std), against zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["runs"]
    panels = {}
    for name, configs in sweeps.items():
        for c in configs:
            p = versus_reference(rows, c) if c.gate != "none" else None
            if p:
                panels.setdefault(name, []).append((c, p["diffs"]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(1.5 + 3.2 * max(1, len(panels)), 4.6), squeeze=False,
                             sharey=True)
    for ax, (name, entries) in zip(axes[0], panels.items()):
        for x, (c, diffs) in enumerate(entries):
            ax.scatter([x] * len(diffs), diffs, s=14, color="gray")
            ax.errorbar(x, np.mean(diffs), yerr=np.std(diffs, ddof=1) if len(diffs) > 1 else 0, fmt="o",
                        color="C1", capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        labels = [f"{'lsm ' if c.loss == 'topk_lsm' else ''}{c.gate}{f' tau{c.tau:g}' if c.tau != 1 else ''}"
                  f"{'' if c.normalize else ' raw'} {c.epochs}x{c.minibatches} lr{c.lr:g}"
                  f"{f' k{c.staleness}' if c.staleness else ''}" for c, _ in entries]
        ax.set_xticks(range(len(entries)), labels, fontsize=7, rotation=90)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("gated - ungated pass@1 (paired by seed)")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no gated run with its ungated pair", ha="center", transform=axes[0][0].transAxes)
    fig.tight_layout()
    fig.savefig(out / "gate_effect.png", dpi=110)
    plt.close(fig)


def missing_note(summary: dict, sweeps: dict, seeds) -> str:
    """Which runs of each sweep are missing (the tables show the finished ones only)."""
    missing = set(summary["meta"]["missing_runs"])
    if not missing:
        return "Every run of these sweeps finished."
    lines = []
    for name, configs in sweeps.items():
        runs = [f"{c.name}/seed{s}" for c in configs for s in seeds]
        absent = [r for r in runs if r in missing]
        by_seed = ", ".join(f"seed {s}: {sum(f'{c.name}/seed{s}' not in missing for c in configs)}" for s in seeds)
        lines.append(f"- {name}: {len(runs) - len(absent)} of {len(runs)} runs finished ({by_seed} of {len(configs)})"
                     + (f"; missing: {', '.join(f'`{r}`' for r in absent)}" if 0 < len(absent) <= 12 else ""))
    return "**Not every run has finished.** The tables show the finished runs only (see the seeds column):\n\n" + \
        "\n".join(lines)


def report(summary: dict, runs: dict, sweeps: dict, args, command: str, samples: int) -> str:
    rows = summary["runs"]
    first = rows[0]
    teacher = first["teacher"] or {}
    titles = {"gate_trace.png": "gate trace", "gate_trace_high_lr.png": "gate trace at a high lr"}
    traces = "".join(f"\n![{titles[name]}]({name})\n" for name in traced_runs(runs))
    sections = "\n\n".join(f"### {name}\n\n{sweep_table(name, configs, summary, samples)}"
                           for name, configs in sweeps.items())
    return f"""# Gate robustness sweeps: results

Made by:

    {command}

**Machine:** {args.machine['machine']} CPU, OMP_NUM_THREADS=1, Python {args.machine['python']}. **Each run:**
{args.steps} steps x 64 prompts x 1 sample on the shipped teacher/student pair, Adam; held-out evaluation of
{args.eval_problems} problems at steps 0, {args.eval_every}, ... (greedy; pass@1 and pass@{samples} from
{samples} samples at T=1 / top-p 0.9). Mean ± std over seeds; the paired column is, per seed, the gated run minus
the same configuration without a gate, and for a run with dual clipping, a proximal pi_old or another advantage
clamp the run minus the same configuration with the defaults (the same seed: the same prompts and rollout seeds at
step 0). "Proximal pi_old": under staleness k, pi_old is the weights before the step (reuse.old_logprobs
"recompute"), not the policy that sampled k versions before; "behavior weight cap c" adds decoupled PPO's weight
min(pi_old / pi_behavior, c) per position (loss.behavior_weight_cap), compared with the proximal run without it.

Base student: greedy {first['greedy_before']:.3f}, pass@1 {first['pass1_before']:.3f},
pass@{samples} {first[f'pass{samples}_before'] or float('nan'):.3f}. Teacher: greedy
{teacher.get('greedy', float('nan')):.3f}, pass@1 {teacher.get('pass1', float('nan')):.3f}.

{sections}

{missing_note(summary, sweeps, args.seeds)}

![sweeps](sweeps.png)

![gate effect, paired by seed](gate_effect.png)

![drift by block](drift_by_block.png)
{traces}"""


if __name__ == "__main__":
    GateRobustness().main()
