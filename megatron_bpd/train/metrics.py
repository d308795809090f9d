"""Per-step metrics: reduced over ranks, written to ``metrics.jsonl`` and TensorBoard, shown on a progress bar,
and plotted (loss, gate statistics, drift, solve rate over steps) at the end of a run."""

import json
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

from ..parallel import compute_device

SHOWN = ("loss", "drift_abs_mean", "gate_min", "solve_rate")


class MetricSums:
    """Weighted sums of scalar metrics on this rank, reduced over all ranks into weighted means."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.weights: Dict[str, float] = {}

    def add(self, name: str, value: float, weight: float = 1.0) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value) * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def reduce(self, names: List[str]) -> Dict[str, float]:
        """Weighted means of ``names`` over every rank's contributions (ranks without one add nothing); names
        no rank contributed to are left out."""
        packed = torch.tensor([[self.sums.get(n, 0.0), self.weights.get(n, 0.0)] for n in names], dtype=torch.float64)
        if dist.is_initialized():
            packed = packed.to(compute_device())  # NCCL reduces CUDA tensors only
            dist.all_reduce(packed)
        return {n: s / w for n, (s, w) in zip(names, packed.tolist()) if w > 0}


class MetricsLog:
    """JSONL + TensorBoard + a tqdm bar over the run's steps (rank 0 only)."""

    def __init__(self, out: Path, total_steps: int, first_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self.tensorboard = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(total=total_steps, initial=first_step, desc="distill", unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tensorboard.add_scalar(key, value, record["step"])
        self.tensorboard.flush()
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in SHOWN if k in record})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.tensorboard.close()


def read_metrics(path: Path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(records: List[dict], path: Path, title: str = "") -> None:
    """One PNG: loss, gate min/mean/max, drift and solve rate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    series = lambda key: [r.get(key, float("nan")) for r in records]  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(steps, series("loss"))
    axes[0].set(title="OPD loss", xlabel="step")
    axes[1].fill_between(steps, series("gate_min"), series("gate_max"), alpha=0.3, label="min..max")
    axes[1].plot(steps, series("gate_mean"), label="mean")
    axes[1].plot(steps, series("gate_frac_below_half"), label="fraction < 0.5")
    axes[1].set(title="gates", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, series("drift_abs_mean"), label="token |drift|")
    axes[2].plot(steps, series("segment_drift_abs_mean"), label="segment |D_s|")
    axes[2].set(title="drift from the behavior policy", xlabel="step")
    axes[2].legend()
    axes[3].plot(steps, series("solve_rate"))
    axes[3].set(title="training solve rate", xlabel="step", ylim=(-0.02, 1.02))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_evals(evals: List[dict], path: Path, title: str = "") -> None:
    """One PNG of the held-out evaluations (``evals.jsonl``): greedy accuracy and pass@1 over training steps with
    their 95% intervals, per difficulty, and the support-KL probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in evals]
    students = [e["student"] for e in evals]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, label in (("greedy", "greedy"), ("pass1", "pass@1 (T=1)")):
        if all(key in s for s in students):
            axes[0].plot(steps, [s[key] for s in students], marker="o", label=label)
            axes[0].fill_between(steps, [s[f"{key}_ci"][0] for s in students], [s[f"{key}_ci"][1] for s in students],
                                 alpha=0.2)
    teacher = next((e["teacher"] for e in evals if "teacher" in e), None)
    if teacher is not None:
        axes[0].axhline(teacher["greedy"], color="gray", linestyle="--", label="teacher (greedy)")
    axes[0].set(title=f"held-out accuracy ({students[0]['n']} problems)", xlabel="step", ylim=(-0.02, 1.02))
    axes[0].legend()
    for d in students[0].get("by_difficulty", {}):
        axes[1].plot(steps, [s["by_difficulty"][d]["greedy"] for s in students], marker="o", label=f"difficulty {d}")
    axes[1].set(title="greedy accuracy by difficulty", xlabel="step", ylim=(-0.02, 1.02))
    if students[0].get("by_difficulty"):
        axes[1].legend()
    axes[2].plot(steps, [e.get("support_kl", float("nan")) for e in evals], marker="o")
    axes[2].set(title="student-teacher KL on the teacher's top-K (probe)", xlabel="step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
