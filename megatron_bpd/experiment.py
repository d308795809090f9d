"""One run-and-evaluate path for the experiments on the synthetic addition task: the CPU demo, the OPD regime study
(``bench/opd_regime.py``) and the gate sweeps describe a run with ``TaskRun``, launch the trainer under torchrun
with ``launch`` and read back its per-step metrics and held-out evaluations (``train/evaluation.py``) with
``read_run``; ``mean_std`` and ``paired`` summarize seeds. Every number they report comes from the trainer's own
evaluation, so a study and the demo measure the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = Path(__file__).parent / "data" / "task_models"


@dataclass
class TaskRun:
    """A distillation run on the addition task. ``loss``: "sampled_token" | "topk_lsm" (OPD, the student samples)
    or "sft" (the control: SFT on teacher samples, the same number of optimizer updates). ``gate`` is a
    ``loss.gate`` section; ``epochs`` x ``minibatches`` optimizer updates per rollout batch."""

    out: str
    student: str
    teacher: str
    prompts: str
    eval_prompts: str
    loss: str = "sampled_token"
    gate: dict = field(default_factory=lambda: {"granularity": "none"})
    steps: int = 20
    seed: int = 0
    lr: float = 3e-4
    tp: int = 1
    prompts_per_step: int = 64  # many prompts, one sample each: see docs/results/opd_regime.md
    samples_per_prompt: int = 1
    epochs: int = 1
    minibatches: int = 2
    micro_batch_size: int = 8
    top_k: int = 8
    max_new_tokens: int = 96
    eval_every: int = 5
    eval_limit: int = 100
    eval_samples: int = 2
    staleness: int = 0  # rollouts sampled k weight versions behind (rollout.max_staleness; behavior log-probs)
    adv_clip: float = 5.0  # the sampled-token loss's advantage clamp (loss.adv_clip)
    dual_clip: Optional[float] = None  # dual-clip PPO's c (loss.dual_clip; None: off)
    # reuse.old_logprobs; None: "rollout" under staleness (the policy that sampled), else "recompute"
    old_logprobs: Optional[str] = None
    drift_control: Optional[dict] = None  # loss.drift_control (e.g. {"kind": "tis", "cap": 2}; None: off)
    gate_trace: int = 0  # trajectories per step whose per-position drift and gates go to gate_trace.jsonl

    def config(self) -> dict:
        """The trainer config (``python -m megatron_bpd.train --config``) of this run."""
        control = self.loss == "sft"
        return {
            "out": self.out, "steps": self.steps, "seed": self.seed, "gate_trace": self.gate_trace,
            "model": {"student": self.student},
            "parallel": {"tp": self.tp},
            "data": {"prompts": self.prompts, "answer_checker": "arithmetic", "apply_chat_template": True},
            "rollout": {"policy": "teacher" if control else "student", "prompts_per_step": self.prompts_per_step,
                        "samples_per_prompt": self.samples_per_prompt, "temperature": 1.0, "top_p": 0.9,
                        "max_new_tokens": self.max_new_tokens, "max_concurrency": 64,
                        "max_staleness": self.staleness},
            "teacher": {"source": "sglang", "model": self.teacher, "top_k": self.top_k},
            "loss": {"kind": self.loss, "gate": {"granularity": "none"} if control else dict(self.gate),
                     "adv_clip": self.adv_clip, "dual_clip": self.dual_clip,
                     "drift_control": self.drift_control or {"kind": "none"}},
            "reuse": {"epochs": self.epochs, "minibatches": self.minibatches,
                      "micro_batch_size": self.micro_batch_size,
                      "old_logprobs": self.old_logprobs or ("rollout" if self.staleness else "recompute")},
            "optimizer": {"optimizer": "adam", "lr": self.lr, "clip_grad": 1.0},
            "eval": {"every": self.eval_every, "prompts": self.eval_prompts, "limit": self.eval_limit,
                     "samples": self.eval_samples},
        }

    def replace(self, **changes) -> "TaskRun":
        return dataclasses.replace(self, **changes)


def task_prompts(data_dir, eval_problems: int, seed: int = 0) -> tuple:
    """The addition task's prompt files under ``data_dir``: (training prompts: the first 2000 training problems,
    held-out prompts: the first ``eval_problems`` test problems) of ``tasks.sft.PrepConfig(seed)``, the split the
    shipped models were trained on."""
    from .tasks.arithmetic import write_prompts_jsonl
    from .tasks.sft import PrepConfig, datasets

    train, test = datasets(PrepConfig(seed=seed))
    data_dir = Path(data_dir)
    return (str(write_prompts_jsonl(data_dir / "prompts.jsonl", train[:2000])),
            str(write_prompts_jsonl(data_dir / "held_out.jsonl", test[:eval_problems])))


def launch(run: TaskRun, follow: Optional[Callable[[dict], None]] = None) -> dict:
    """Train ``run`` under torchrun (``run.tp`` local processes over gloo) into a clean ``run.out`` and return
    ``read_run``'s result with the wall time. ``follow(record)`` is called for each finished step."""
    return launch_config(run.config(), follow)


def launch_config(config: dict, follow: Optional[Callable[[dict], None]] = None) -> dict:
    """``launch`` for any trainer config (a dict with ``out`` and ``parallel.tp``)."""
    out = Path(config["out"])
    for stale in ("metrics.jsonl", "evals.jsonl", "gate_trace.jsonl", "tensorboard", "weights", "logs", "run.json"):
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    nproc = config.get("parallel", {}).get("tp", 1) * config.get("parallel", {}).get("pp", 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_bpd.train", "--config", str(config_path)]
    started = time.perf_counter()
    with open(out / "train.log", "w") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        seen = 0
        while process.poll() is None:
            time.sleep(2)
            records = _jsonl(out / "metrics.jsonl")
            for record in records[seen:]:
                if follow is not None:
                    follow(record)
            seen = len(records)
    if process.returncode != 0:
        raise RuntimeError(f"training failed ({process.returncode}); last lines of {out / 'train.log'}:\n"
                           + "\n".join((out / "train.log").read_text(errors="replace").splitlines()[-30:]))
    result = read_run(out)
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "run.json").write_text(json.dumps({"seconds": result["seconds"], "config": config}, indent=1))
    return result


def read_run(out) -> dict:
    """``{"metrics": [per-step records], "evals": [held-out evaluations], "seconds": wall time or None}``."""
    out = Path(out)
    meta = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    return {"metrics": _jsonl(out / "metrics.jsonl"), "evals": _jsonl(out / "evals.jsonl"),
            "seconds": meta.get("seconds")}


def _jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values) -> dict:
    """``{"mean", "std" (sample std; 0 for one value), "n"}`` of the values that are not None."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired(a: dict, b: dict) -> Optional[dict]:
    """Per-seed differences a[seed] - b[seed] over the seeds both have (same seed: same prompt order, rollout seeds
    and held-out problems): ``mean_std`` plus ``diffs`` and ``seeds``; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return {**mean_std(diffs), "diffs": diffs, "seeds": seeds}
