"""The README's main job, shortened: the CPU demo runs end to end (shipped task models, torchrun at TP=2, embedded
servers, evaluation) and writes its report with the promised per-step keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"step", "loss", "gate_mean", "gate_min", "gate_max", "drift_abs_mean", "solve_rate"}


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_bpd.demo", "--out", str(out), "--steps", "2", "--eval-problems", "8"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert 0.0 <= r["solve_rate"] <= 1.0 and r["gate_min"] <= r["gate_mean"] <= r["gate_max"]
        assert r["rollout_train_mismatch"] < 1e-5
    report = (out / "report.md").read_text()
    assert "| teacher | 1.000 |" in report  # the shipped teacher solves every held-out problem
    assert (out / "training.png").stat().st_size > 10_000 and (out / "tensorboard").is_dir()
