"""Toy-scale evidence for issue 7: six OPD variants on the synthetic column-addition task, on CPU.

    python bench/toy_six_variants.py [--seeds 0 1 2] [--steps 30] [--variants ...] [--out docs/results]
    (it ran on the earlier task-model pair and budget; docs/results/opd_regime.md explains why that regime could
    not show OPD working)
    python bench/toy_six_variants.py --quick --out /tmp/q      # smoke test (< 2 min)

Variants: {sampled-token OPD, Teacher-TopK/LSM} x {no gate, Block-B, NewlineSpan}, each trained with the same budget
(``--steps`` steps of 4 prompts x 4 samples, 2 reuse epochs x 2 mini-batches) from the same student, with the
trainer (``python -m megatron_bpd.train``, TP=1, one process; rollouts and teacher scores from embedded servers).
Every final student, the base student and the teacher are evaluated the same way: ``--eval-n`` samples per
held-out problem at temperature 1.0, top-p 0.9 through the project's server (``EmbeddedServer`` +
``generate_rollout``, the same sampling seeds for every model), checked with ``tasks.arithmetic.check``, pass@1 and
pass@8 with the unbiased estimator (``eval.passk``). Mean and standard deviation across seeds.

Runs are cached by folder (``--work``/<variant>/seed<k>/ with ``metrics.jsonl`` + ``eval.json``): a later call
skips finished runs, so an interrupted sweep continues where it stopped. Writes ``toy_six_variants.md``,
``toy_six_variants.json`` and PNG plots into ``--out`` (from every finished run found in ``--work``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK = 16  # tokens: the task's responses are ~40-80 tokens (one ~12-token line per digit column + 2 answer lines)
SPAN = {"span_min_len": 4, "span_max_len": 64, "span_fallback_block": BLOCK}
GATES = {
    "none": {"granularity": "none"},
    f"block{BLOCK}": {"granularity": "block", "block_size": BLOCK},
    "newline": {"granularity": "span", **SPAN},
}
LOSSES = {"opd": "sampled_token", "lsm": "topk_lsm"}
VARIANTS = [f"{loss}-{gate}" for loss in LOSSES for gate in GATES]
LABELS = {"opd-none": "sampled-token OPD", f"opd-block{BLOCK}": f"OPD + Block{BLOCK}",
          "opd-newline": "OPD + NewlineSpan", "lsm-none": "Teacher-TopK/LSM",
          f"lsm-block{BLOCK}": f"LSM + Block{BLOCK}", "lsm-newline": "LSM + NewlineSpan"}
QUICK_VARIANTS = [f"opd-block{BLOCK}", "lsm-newline"]
METRIC_KEYS = ("loss", "solve_rate", "gate_min", "gate_max", "gate_mean", "gate_std", "gate_frac_below_half",
               "drift_abs_mean", "drift_mean", "segment_drift_abs_mean", "support_kl", "response_length",
               "truncated_fraction", "pg_clipfrac", "ratio_mean")


def log(msg: str) -> None:
    print(f"[toy6 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- models

def task_models(models_dir: Path | None) -> dict:
    """{"teacher": path, "student": path}: ``--models`` (a folder with teacher/ and student/), the shipped pair in
    megatron_bpd/data/task_models when present, else the cached ``prepare_teacher_and_student`` pair (seed 0)."""
    for base in ([models_dir] if models_dir else []) + [ROOT / "megatron_bpd" / "data" / "task_models"]:
        if all((base / role / "config.json").exists() for role in ("teacher", "student")):
            return {role: str(base / role) for role in ("teacher", "student")}
    if models_dir:
        raise FileNotFoundError(f"--models {models_dir}: needs teacher/ and student/ HF folders")
    from megatron_bpd.tasks.sft import prepare_teacher_and_student
    summary = prepare_teacher_and_student(Path.home() / ".cache" / "megatron-bpd" / "task-models", 0)
    return {role: summary[role]["path"] for role in ("teacher", "student")}


# ---------------------------------------------------------------------------------------------------- training

def run_config(run_dir: Path, variant: str, seed: int, models: dict, prompts: Path, args) -> dict:
    loss, gate = variant.split("-", 1)
    return {
        "out": str(run_dir), "steps": args.steps, "seed": seed,
        "model": {"student": models["student"]},
        "parallel": {"tp": 1},
        "data": {"prompts": str(prompts), "answer_checker": "arithmetic", "apply_chat_template": True},
        "rollout": {"servers": ["embedded"], "prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
                    "temperature": 1.0, "top_p": 0.9, "max_new_tokens": args.max_new_tokens,
                    "max_concurrency": 16},
        "teacher": {"source": "sglang", "model": models["teacher"], "servers": ["embedded"], "top_k": args.top_k},
        "loss": {"kind": LOSSES[loss], "gate": dict(GATES[gate])},
        "reuse": {"epochs": 2, "minibatches": 2, "micro_batch_size": args.micro_batch},
        "optimizer": {"optimizer": "adam", "lr": args.lr, "clip_grad": 1.0},
    }


def train(run_dir: Path, config: dict) -> float:
    """Run the trainer (``experiment.launch_config``); return its wall time. Stale outputs are removed."""
    from megatron_bpd.experiment import launch_config

    (run_dir / "eval.json").unlink(missing_ok=True)
    return launch_config(config)["seconds"]


def final_weights(run_dir: Path) -> Path:
    return max((p for p in (run_dir / "weights").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def prune_weights(run_dir: Path) -> None:
    """Keep only the final exported weights (the per-step exports are for the rollout servers)."""
    final = final_weights(run_dir)
    for p in (run_dir / "weights").iterdir():
        if p != final and p.is_dir():
            shutil.rmtree(p)


# ---------------------------------------------------------------------------------------------------- evaluation

class Evaluator:
    """pass@k of models through embedded servers: one server per architecture, students swapped in by
    ``update_weights_from_disk`` (all trained students share the base student's shapes)."""

    def __init__(self, problems, n: int, max_new_tokens: int, seed: int, logs: Path):
        self.problems, self.n, self.max_new_tokens, self.seed, self.logs = problems, n, max_new_tokens, seed, logs
        self.servers: dict = {}

    def _server(self, key: str, model: str):
        from megatron_bpd.serve.launch import EmbeddedServer
        if key not in self.servers:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            self.servers[key] = EmbeddedServer(model, log_path=self.logs / f"eval-server-{key}.log", env=env,
                                               extra_args=["--max-running-requests", "128"]).start()
        return self.servers[key]

    def evaluate(self, key: str, base_model: str, weights: str | None = None) -> dict:
        """Evaluate ``weights`` (an HF folder; None: ``base_model`` itself) on the server of ``base_model``."""
        from transformers import AutoTokenizer

        from megatron_bpd.eval.passk import mean_pass_at_k
        from megatron_bpd.rollout import ClientConfig, RolloutConfig, SamplingParams, SGLangClient, generate_rollout
        from megatron_bpd.tasks.arithmetic import check
        from megatron_bpd.tasks.sft import _prompt_ids

        server = self._server(key, base_model)
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        prompts = [_prompt_ids(tokenizer, p.prompt_text) for p in self.problems]
        config = RolloutConfig(n_samples=self.n, seed=self.seed, sampling=SamplingParams(
            temperature=1.0, top_p=0.9, max_new_tokens=self.max_new_tokens))
        t0 = time.perf_counter()

        async def go():
            async with SGLangClient(ClientConfig([server.url], max_concurrency=128)) as client:
                await client.post(server.url, "/update_weights_from_disk",
                                  {"model_path": str(weights or base_model)})
                return await generate_rollout(client, prompts, config)

        batch = asyncio.run(go())
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.response_ids]
        correct = np.zeros(len(self.problems), dtype=np.int64)
        for k, text in enumerate(texts):
            i = batch.prompt_index[k]
            correct[i] += check(text, self.problems[i].answer)
        ks = [k for k in (1, 8) if k <= self.n]
        passk = mean_pass_at_k(self.n, correct, ks)
        digits = sorted({p.digits for p in self.problems})
        by_digits = {str(d): float(np.mean([correct[i] / self.n for i, p in enumerate(self.problems)
                                            if p.digits == d])) for d in digits}
        return {"model": str(weights or base_model), "n_problems": len(self.problems), "n_samples": self.n,
                **{f"pass@{k}": v for k, v in passk.items()}, "pass@1_by_digits": by_digits,
                "correct_per_problem": correct.tolist(),
                "mean_response_tokens": float(np.mean([len(r) for r in batch.response_ids])),
                "seconds": round(time.perf_counter() - t0, 1)}

    def close(self):
        for server in self.servers.values():
            server.stop()


# ---------------------------------------------------------------------------------------------------- aggregation

def read_run(run_dir: Path) -> dict | None:
    metrics, ev = run_dir / "metrics.jsonl", run_dir / "eval.json"
    if not (metrics.exists() and ev.exists()):
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"records": records, "eval": json.loads(ev.read_text())}


def mean_std(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()) if v.size else float("nan"),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size), "values": v.tolist()}


def aggregate(work: Path, variants, baselines: dict) -> dict:
    out = {"baselines": baselines, "variants": {}}
    for variant in variants:
        runs = {}
        for seed_dir in sorted((work / variant).glob("seed*")):
            run = read_run(seed_dir)
            if run is not None:
                runs[int(seed_dir.name[4:])] = run
        if not runs:
            continue
        entry = {"label": LABELS.get(variant, variant), "seeds": sorted(runs)}
        for k in ("pass@1", "pass@8"):
            entry[k] = mean_std([r["eval"][k] for r in runs.values() if k in r["eval"]])
        summary = {}
        for key in METRIC_KEYS:
            per_run = [[rec.get(key) for rec in r["records"]] for r in runs.values()]
            if all(v is None for run in per_run for v in run):
                continue
            finite = [np.asarray([np.nan if v is None else v for v in run], dtype=float) for run in per_run]
            summary[key] = {"over_training_mean": mean_std([np.nanmean(f) for f in finite]),
                            "final_step": mean_std([f[-1] for f in finite]),
                            "min_over_training": float(np.nanmin(np.concatenate(finite))),
                            "max_over_training": float(np.nanmax(np.concatenate(finite)))}
        entry["training"] = summary
        entry["per_seed"] = {s: {"pass@1": r["eval"].get("pass@1"), "pass@8": r["eval"].get("pass@8"),
                                 "pass@1_by_digits": r["eval"].get("pass@1_by_digits"),
                                 "train_seconds": r["eval"].get("train_seconds"),
                                 "steps": len(r["records"]),
                                 "curves": {k: [rec.get(k) for rec in r["records"]] for k in METRIC_KEYS}}
                             for s, r in sorted(runs.items())}
        out["variants"][variant] = entry
    return out


# ---------------------------------------------------------------------------------------------------- plots

def plots(result: dict, out: Path, smooth: int = 5) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    variants = result["variants"]
    if not variants:
        return written

    def band(ax, curves, label, color=None):
        width = min(len(c) for c in curves)
        arr = np.asarray([[np.nan if v is None else v for v in c[:width]] for c in curves], dtype=float)
        if smooth > 1 and width >= smooth:
            kernel = np.ones(smooth) / smooth
            arr = np.asarray([np.convolve(np.nan_to_num(a), kernel, mode="valid") for a in arr])
        x = np.arange(arr.shape[1]) + (smooth - 1 if smooth > 1 and width >= smooth else 0)
        mean = arr.mean(0)
        line, = ax.plot(x, mean, label=label, color=color)
        if arr.shape[0] > 1:
            ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.2, color=line.get_color())

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, loss in zip(axes, LOSSES):
        for variant, entry in variants.items():
            if variant.startswith(loss):
                band(ax, [r["curves"]["solve_rate"] for r in entry["per_seed"].values()], entry["label"])
        for name, base in result["baselines"].items():
            if name != "teacher":
                ax.axhline(base["pass@1"], ls="--", lw=1, color="gray", label=f"{name} pass@1 (held-out eval)")
        teacher = result["baselines"].get("teacher", {}).get("pass@1", float("nan"))
        ax.set(title=f"{'sampled-token OPD' if loss == 'opd' else 'Teacher-TopK/LSM'}: training solve rate\n"
                     f"({smooth}-step running mean; band = seed min..max; teacher pass@1 {teacher:.2f})",
               xlabel="step", ylabel="solve rate (rollouts of the step)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "toy_six_variants_solve_rate.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    gated = {v: e for v, e in variants.items() if not v.endswith("-none")}
    if gated:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for variant, entry in variants.items():
            curves = lambda k: [r["curves"][k] for r in entry["per_seed"].values()]  # noqa: E731
            band(axes[0], curves("drift_abs_mean"), entry["label"])
        axes[0].set(title="token |drift| |lp_cur - lp_old| (all variants)", xlabel="step")
        for variant, entry in gated.items():
            seeds = list(entry["per_seed"].values())
            width = min(len(r["curves"]["gate_min"]) for r in seeds)
            gmin = np.mean([[np.nan if v is None else v for v in r["curves"]["gate_min"][:width]] for r in seeds], 0)
            gmax = np.mean([[np.nan if v is None else v for v in r["curves"]["gate_max"][:width]] for r in seeds], 0)
            line, = axes[1].plot(np.arange(width), gmin, label=f"{entry['label']} min")
            axes[1].plot(np.arange(width), gmax, ls="--", color=line.get_color(), label=f"{entry['label']} max")
            band(axes[2], [r["curves"]["segment_drift_abs_mean"] for r in seeds], entry["label"])
        axes[1].axhline(1.0, color="k", lw=0.5)
        axes[1].set(title="normalized gate min / max per step (mean over seeds)", xlabel="step")
        axes[2].set(title="segment |D_s| (gated variants)", xlabel="step")
        for ax in axes:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out / "toy_six_variants_drift_gates.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        # Gate distribution: the per-step summaries of every step and seed (per-position gates are not logged).
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for variant, entry in gated.items():
            mins = [v for r in entry["per_seed"].values() for v in r["curves"]["gate_min"] if v is not None]
            stds = [v for r in entry["per_seed"].values() for v in r["curves"]["gate_std"] if v is not None]
            axes[0].hist(mins, bins=30, alpha=0.5, label=entry["label"])
            axes[1].hist(stds, bins=30, alpha=0.5, label=entry["label"])
        axes[0].set(title="per-step minimum gate (all steps, all seeds)", xlabel="gate_min", ylabel="steps")
        axes[1].set(title="per-step gate std (all steps, all seeds)", xlabel="gate_std", ylabel="steps")
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "toy_six_variants_gate_distribution.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------- report

def fmt(ms: dict) -> str:
    if not ms or ms.get("n", 0) == 0:
        return "-"
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}" if ms["n"] > 1 else f"{ms['mean']:.3f}"


def report(result: dict, args, command: str, plot_files: list, elapsed: float) -> str:
    meta = result["meta"]
    rows = []
    for name, base in result["baselines"].items():
        rows.append(f"| {name} | - | {base['pass@1']:.3f} | {base.get('pass@8', float('nan')):.3f} | - | - | - | - |")
    for variant, e in result["variants"].items():
        t = e["training"]
        g = lambda k, field="over_training_mean": fmt(t[k][field]) if k in t else "-"  # noqa: E731
        gate_range = (f"{t['gate_min']['min_over_training']:.3f} .. {t['gate_max']['max_over_training']:.3f}"
                      if "gate_min" in t and not variant.endswith("-none") else "1 (no gate)")
        rows.append(f"| {e['label']} | {len(e['seeds'])} | {fmt(e['pass@1'])} | {fmt(e['pass@8'])} | "
                    f"{g('drift_abs_mean')} | {g('segment_drift_abs_mean')} | {gate_range} | "
                    f"{g('gate_frac_below_half')} |")
    table = "\n".join(rows)
    partial = meta["missing_runs"]
    status = ("**Partial sweep.** Missing runs (variant/seed): " + ", ".join(partial) +
              f". Complete it with the same command (finished runs are cached in `{meta['work']}`).\n"
              if partial else "Complete sweep: every requested variant x seed finished.\n")
    images = "\n".join(f"![{p.stem}]({p.name})" for p in plot_files)
    probe = lr_probe_section(result.get("lr_probe"))
    return f"""# Toy six-variant OPD benchmark (issue 7)

{status}
Made by:

    {command}

({elapsed / 60:.1f} min for this invocation; each run's wall time is in `toy_six_variants.json`.)

**Machine:** {meta['machine']}. **Models:** the task's tiny Qwen3 teacher (4 layers, hidden 128) and student
(2 layers, hidden 64) from `{Path(meta['models']['student']).parent}` (column addition, 2-4 digits).
**Budget per run (identical for every variant):** {meta['steps']} steps x {meta['prompts']} prompts x
{meta['samples']} samples, 2 reuse epochs x 2 mini-batches (4 optimizer steps per rollout batch), Adam lr
{meta['lr']}, grad clip 1.0, max {meta['max_new_tokens']} new tokens, teacher top-K {meta['top_k']} (LSM support),
TP=1, one trainer process, embedded rollout and teacher servers. Gate: exp(-tau |D_s|), tau 1, signed-mean
statistic, normalized over each micro-batch ({meta['micro_batch']} sequences). Block-{BLOCK} (responses are
~40-80 tokens, so B=64 would be a single block per response, i.e. the sequence gate); NewlineSpan: one span per
line, min {SPAN['span_min_len']} / max {SPAN['span_max_len']} tokens, fallback block {BLOCK}.
**Evaluation:** {meta['eval_problems']} held-out problems (2-4 digits), n = {meta['eval_n']} samples each at
temperature 1.0, top-p 0.9 (the same sampling seeds for every model), exact checker, unbiased pass@k; mean ± std
(sample std, ddof 1) across training seeds. The trainer seed changes the prompt order and the rollout samples; the
teacher/student pair is the same for every seed.

| variant | seeds | pass@1 | pass@8 | token \\|drift\\| (mean over steps) | segment \\|D_s\\| | gate min .. max (over training) | frac gate < 0.5 |
|---|---|---|---|---|---|---|---|
{table}

{result.get('reading', '')}
{result.get('notes', '')}
{images}
{probe}

Files: `toy_six_variants.json` (every number: per-seed pass@k, pass@1 by digit count, per-step training curves),
the plots above. Per-position gate values are not logged by the trainer, so the gate distribution plot shows the
per-step minimum and standard deviation of the normalized gates over all steps and seeds.
"""


def reading(result: dict) -> str:
    """An automatic, factual summary: gate vs no gate per loss, in seed-std units, and the drift scale."""
    v = result["variants"]
    lines = ["## Reading (as measured)", ""]
    for loss in LOSSES:
        base = v.get(f"{loss}-none")
        if base is None:
            continue
        for gate in list(GATES)[1:]:
            e = v.get(f"{loss}-{gate}")
            if e is None:
                continue
            d1 = e["pass@1"]["mean"] - base["pass@1"]["mean"]
            d8 = e["pass@8"]["mean"] - base["pass@8"]["mean"]
            spread = max(e["pass@8"]["std"], base["pass@8"]["std"])
            lines.append(f"- {e['label']} vs {base['label']}: pass@1 {d1:+.3f}, pass@8 {d8:+.3f} "
                         f"(seed std of pass@8 up to {spread:.3f}; {len(e['seeds'])} vs {len(base['seeds'])} seeds).")
    drifts = [(e["label"], e["training"]["drift_abs_mean"]["over_training_mean"]["mean"],
               e["training"].get("gate_min", {}).get("min_over_training"))
              for k, e in v.items() if "drift_abs_mean" in e["training"] and not k.endswith("-none")]
    if drifts:
        lines.append("")
        lines.append("Drift within a rollout's reuse (current vs behavior student, per token, mean over steps): " +
                     "; ".join(f"{lab} {d:.3f} (lowest gate {m:.3f})" for lab, d, m in drifts) + ".")
    return "\n".join(lines)


def lr_probe(paths) -> list:
    """Rows of earlier invocations' ``toy_six_variants.json`` (e.g. one per learning rate): variant, seed, lr,
    pass@k, drift and gate range, and the command that made each."""
    rows = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for variant, e in data["variants"].items():
            for seed, run in e["per_seed"].items():
                c = run["curves"]
                rows.append({"lr": data["meta"]["lr"], "variant": variant, "label": e["label"], "seed": seed,
                             "steps": run["steps"], "pass@1": run["pass@1"], "pass@8": run["pass@8"],
                             "base_pass@1": data["baselines"]["base student"]["pass@1"],
                             "drift_abs_mean": float(np.nanmean([v for v in c["drift_abs_mean"] if v is not None])),
                             "gate_min": min(v for v in c["gate_min"] if v is not None),
                             "gate_max": max(v for v in c["gate_max"] if v is not None),
                             "mean_solve_last10": float(np.mean([v for v in c["solve_rate"][-10:] if v is not None])),
                             "command": data["meta"]["command"]})
    return sorted(rows, key=lambda r: (r["variant"], r["lr"]))


def lr_probe_section(rows) -> str:
    if not rows:
        return ""
    table = "\n".join(f"| {r['lr']:g} | {r['label']} | {r['seed']} | {r['steps']} | {r['pass@1']:.3f} | "
                      f"{r['pass@8']:.3f} | {r['mean_solve_last10']:.3f} | {r['drift_abs_mean']:.4f} | "
                      f"{r['gate_min']:.3f} .. {r['gate_max']:.3f} |" for r in rows)
    commands = "\n".join(f"    {c}" for c in dict.fromkeys(r["command"] for r in rows))
    return f"""
## Learning-rate probe (before the sweep; one seed)

No-gate runs at three learning rates, same budget and evaluation as the sweep (base student pass@1
{rows[0]['base_pass@1']:.3f}). The sweep uses lr 3e-4: the lowest of these rates at which the student drifts enough
within a rollout's reuse for the gates to differ from 1 at all (token drift ~0.015; at 1e-4 it is ~0.005, gates
within ~1 % of 1), without the collapse of 1e-3. It is not the rate that hurts the student least (1e-4 is), and no
rate tried improves on the base student. The probe's JSON files are copied into `toy_six_variants_lr_probe/`.

| lr | variant | seed | steps | pass@1 | pass@8 | training solve (last 10 steps) | token \\|drift\\| | gate min .. max |
|---|---|---|---|---|---|---|---|---|
{table}

Made by:

{commands}
"""


# ---------------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results",
                   help="where the report, JSON and plots go (--quick: a scratch folder is required)")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: runs/toy_six_variants, or "
                   "OUT/work with --quick)")
    p.add_argument("--models", type=Path, default=None, help="folder with teacher/ and student/ HF models")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=8)
    p.add_argument("--eval-seed", type=int, default=4242)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 steps, 2 variants, 8 problems")
    p.add_argument("--lr-probe", nargs="*", default=[], type=Path,
                   help="toy_six_variants.json files of other invocations (e.g. other --lr) to tabulate too")
    p.add_argument("--notes", type=Path, default=None, help="a Markdown file included after the automatic reading "
                   "(the interpretation written after looking at the numbers)")
    p.add_argument("--report-only", action="store_true", help="only aggregate the finished runs found in --work")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.variants = args.seeds[:1], min(args.steps, 2), QUICK_VARIANTS
        args.eval_problems = min(args.eval_problems, 8)
        if ROOT / "docs" in [args.out.resolve(), *args.out.resolve().parents]:
            p.error("--quick never writes into docs/ (it would replace the published results): give --out DIR")
    work = (args.work or (args.out / "work" if args.quick else ROOT / "runs" / "toy_six_variants")).resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/toy_six_variants.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()

    from megatron_bpd.tasks.arithmetic import write_prompts_jsonl
    from megatron_bpd.tasks.sft import PrepConfig, datasets

    models = task_models(args.models)
    train_set, test_set = datasets(PrepConfig(seed=0))
    prompts = write_prompts_jsonl(work / "prompts.jsonl", train_set[:2000])
    problems = test_set[:args.eval_problems]
    evaluator = Evaluator(problems, args.eval_n, args.max_new_tokens, args.eval_seed, work)
    eval_tag = f"p{args.eval_problems}-n{args.eval_n}-t{args.max_new_tokens}-s{args.eval_seed}"
    baselines = {}
    timings = {}
    try:
        for name, role in (("base student", "student"), ("teacher", "teacher")):
            path = work / f"baseline-{role}-{eval_tag}.json"
            if not path.exists() and not args.report_only:
                log(f"eval {name}")
                path.write_text(json.dumps(evaluator.evaluate(role, models[role]), indent=1))
            if path.exists():
                baselines[name] = json.loads(path.read_text())
                log(f"{name}: pass@1 {baselines[name]['pass@1']:.3f} pass@8 {baselines[name].get('pass@8', 0):.3f}")
        total = len(args.variants) * len(args.seeds)
        done = 0
        for seed in args.seeds:  # seed-major: a partial sweep has whole seeds of every variant
            for variant in args.variants:
                done += 1
                run_dir = work / variant / f"seed{seed}"
                config = run_config(run_dir, variant, seed, models, prompts, args)
                ev_path = run_dir / "eval.json"
                same = ((run_dir / "config.yaml").exists() and
                        yaml.safe_load((run_dir / "config.yaml").read_text()) == config)
                if same and read_run(run_dir) is not None and json.loads(ev_path.read_text()).get("tag") == eval_tag:
                    log(f"[{done}/{total}] {variant} seed {seed}: cached")
                    continue
                if args.report_only:
                    continue
                if same and (run_dir / "metrics.jsonl").exists() and (run_dir / "weights").exists() and \
                        len((run_dir / "metrics.jsonl").read_text().splitlines()) == args.steps:
                    seconds = json.loads((run_dir / "train_time.json").read_text())["seconds"] \
                        if (run_dir / "train_time.json").exists() else None
                else:
                    log(f"[{done}/{total}] {variant} seed {seed}: training {args.steps} steps")
                    seconds = train(run_dir, config)
                    (run_dir / "train_time.json").write_text(json.dumps({"seconds": seconds}))
                prune_weights(run_dir)
                ev = evaluator.evaluate("student", models["student"], str(final_weights(run_dir)))
                ev.update(tag=eval_tag, train_seconds=seconds)
                ev_path.write_text(json.dumps(ev, indent=1))
                rec = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                timings[f"{variant}/seed{seed}"] = seconds
                log(f"[{done}/{total}] {variant} seed {seed}: train {seconds or float('nan'):.0f}s, eval {ev['seconds']:.0f}s; "
                    f"pass@1 {ev['pass@1']:.3f} pass@8 {ev.get('pass@8', 0):.3f}; last solve "
                    f"{rec[-1].get('solve_rate', float('nan')):.2f}, |drift| mean "
                    f"{np.mean([r.get('drift_abs_mean', 0) for r in rec]):.4f}, gate min "
                    f"{min(r.get('gate_min', 1) for r in rec):.3f}")
    finally:
        evaluator.close()

    result = aggregate(work, args.variants, baselines)
    missing = [f"{v}/seed{s}" for s in args.seeds for v in args.variants
               if s not in result["variants"].get(v, {}).get("seeds", [])]
    result["meta"] = {"command": command, "machine": machine(), "models": models, "work": str(work),
                      "steps": args.steps, "prompts": args.prompts, "samples": args.samples, "lr": args.lr,
                      "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch,
                      "eval_problems": len(problems), "eval_n": args.eval_n, "eval_seed": args.eval_seed,
                      "seeds_requested": args.seeds, "variants_requested": args.variants,
                      "missing_runs": missing, "block_size": BLOCK, "span": SPAN}
    result["reading"] = reading(result)
    result["lr_probe"] = lr_probe(args.lr_probe)
    result["notes"] = "\n" + args.notes.read_text() if args.notes else ""
    plot_files = plots(result, out)
    (out / "toy_six_variants.json").write_text(json.dumps(result, indent=1))
    (out / "toy_six_variants.md").write_text(report(result, args, command, plot_files, time.perf_counter() - started))
    log(f"wrote {out / 'toy_six_variants.md'} ({len(result['variants'])} variants, {len(missing)} runs missing) in "
        f"{time.perf_counter() - started:.0f}s")
    return result


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "?"
    return (f"{platform.machine()} {platform.processor() or ''} CPU, {cores} cores visible (shared with other jobs), "
            f"OMP_NUM_THREADS=1, Python {platform.python_version()}, torch {tv}").replace("  ", " ")


if __name__ == "__main__":
    main()
