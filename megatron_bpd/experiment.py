"""One run-and-evaluate path for the experiments on the synthetic tasks: the CPU demo and the studies
(``studies/``) describe a run with ``TaskRun``, launch the trainer under torchrun with ``launch`` and read back its
per-step metrics and held-out evaluations (``train/evaluation.py``) with ``read_run`` (or ``run_record`` of the
files a study archived); ``mean_std`` and ``paired`` summarize seeds. Every number they report comes from the
trainer's own evaluation, so a study and the demo measure the same way.
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

from .tasks.registry import TASKS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODELS = TASKS["addition"].models  # the addition task's pair (the demo's default)


@dataclass
class TaskRun:
    """A distillation run on a synthetic ``task`` (``tasks.registry``). ``loss``: "sampled_token" | "topk_lsm" (OPD,
    the student samples) or "sft" (the control: SFT on teacher samples, the same number of optimizer updates).
    ``gate`` is a
    ``loss.gate`` section; ``epochs`` x ``minibatches`` optimizer updates per rollout batch. ``overrides`` sets any
    other TrainConfig setting ("section.key": value, e.g. ``{"rollout.max_staleness": 2}``) over these."""

    out: str
    student: str
    teacher: str
    prompts: str
    eval_prompts: str
    task: str = "addition"  # its exact answer checker (``tasks.registry``)
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
    overrides: dict = field(default_factory=dict)

    def config(self) -> dict:
        """The trainer config (``python -m megatron_bpd.train --config``) of this run."""
        control = self.loss == "sft"
        config = {
            "out": self.out, "steps": self.steps, "seed": self.seed,
            "model": {"student": self.student},
            "parallel": {"tp": self.tp},
            "data": {"prompts": self.prompts, "answer_checker": self.task, "apply_chat_template": True},
            "rollout": {"policy": "teacher" if control else "student", "prompts_per_step": self.prompts_per_step,
                        "samples_per_prompt": self.samples_per_prompt, "temperature": 1.0, "top_p": 0.9,
                        "max_new_tokens": self.max_new_tokens, "max_concurrency": 64},
            "teacher": {"source": "sglang", "model": self.teacher, "top_k": self.top_k},
            "loss": {"kind": self.loss, "gate": {"granularity": "none"} if control else dict(self.gate)},
            "reuse": {"epochs": self.epochs, "minibatches": self.minibatches,
                      "micro_batch_size": self.micro_batch_size},
            "optimizer": {"optimizer": "adam", "lr": self.lr, "clip_grad": 1.0},
            "eval": {"every": self.eval_every, "prompts": self.eval_prompts, "limit": self.eval_limit,
                     "samples": self.eval_samples},
        }
        for key, value in self.overrides.items():
            *sections, name = key.split(".")
            node = config
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = value
        return config

    def replace(self, **changes) -> "TaskRun":
        return dataclasses.replace(self, **changes)


def task_prompts(data_dir, eval_problems: int, seed: int = 0, task: str = "addition", eval_split: Optional[str] = None,
                 horizon=None):
    """A task's prompt files under ``data_dir``: (training prompts, held-out prompts: the first ``eval_problems``).
    ``eval_split`` "dev" (every choice) or "test" (the report) evaluates on that split of
    ``tasks.registry.study_splits`` at ``horizon`` and trains on its ``train`` split. None (the default) is "dev",
    except for the addition task, whose default keeps the split its shipped pair was made with
    (``tasks.sft.PrepConfig(seed)``: the first 2000 training problems, the test problems; the demo and the earlier
    studies)."""
    from .tasks.common import write_prompts_jsonl
    from .tasks.registry import get_task, study_splits

    if task == "addition" and eval_split is None:
        from .tasks.sft import PrepConfig, datasets

        train, held_out = datasets(PrepConfig(seed=seed))
        train = train[:2000]
    else:
        split = study_splits(get_task(task), seed, horizon=horizon)
        train, held_out = split["train"], split[eval_split or "dev"]
    data_dir = Path(data_dir)
    return (str(write_prompts_jsonl(data_dir / "prompts.jsonl", train)),
            str(write_prompts_jsonl(data_dir / "held_out.jsonl", held_out[:eval_problems])))


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
            metrics = out / "metrics.jsonl"
            records = _jsonl(metrics.read_text()) if metrics.exists() else []
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
    """``run_record`` of the run folder ``out``."""
    out = Path(out)
    return run_record({name: (out / name).read_text() for name in ("run.json", "metrics.jsonl", "evals.jsonl")
                       if (out / name).exists()})


def run_record(files: dict) -> dict:
    """``{"metrics": [per-step records], "evals": [held-out evaluations], "seconds": wall time or None}`` of a run
    given as its files' texts (file name -> text; a study keeps its runs that way, ``studies/archive.py``)."""
    meta = json.loads(files["run.json"]) if "run.json" in files else {}
    return {"metrics": _jsonl(files.get("metrics.jsonl", "")), "evals": _jsonl(files.get("evals.jsonl", "")),
            "seconds": meta.get("seconds")}


def _jsonl(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
