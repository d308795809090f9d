"""bench/gate_robustness.py --quick end to end (2 configurations x 1 seed x 2 steps: trainer + embedded servers,
one of them with overlapped rollouts k=1): results.json has the issue's fields with probabilities in order, the
gate trace is read back, the report and plots are written, a second call trains nothing, and --quick refuses
docs/."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gate_robustness.py"
FIELDS = ("variant", "loss", "granularity", "block_size", "reuse_epochs", "staleness", "seed", "pass1", "pass2",
          "greedy", "drift_abs_mean", "gate_min", "gate_std")


def _load():
    spec = importlib.util.spec_from_file_location("gate_robustness", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.newest_only
def test_quick_writes_consistent_results(tmp_path):
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(ROOT / "docs" / "results" / "gate_quick")])
    assert not (ROOT / "docs" / "results" / "gate_quick").exists()

    bench.main(["--quick", "--out", str(tmp_path)])
    for name in ("report.md", "results.json", "sweeps.png", "gate_effect.png", "drift_by_block.png",
                 "gate_trace.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["missing_runs"] == []
    rows = {r["config"]: r for r in saved["runs"]}
    assert set(rows) == {c.name for c in bench.QUICK}
    for r in rows.values():
        assert all(key in r for key in FIELDS), r.keys()
        assert 0 <= r["pass1"] <= r["pass2"] <= 1 and 0 <= r["greedy"] <= 1
        assert 0 < r["gate_min"] <= 1 and r["gate_std"] >= 0 and r["drift_abs_mean"] >= 0
        assert [p["step"] for p in r["curve"]] == [0, 1, 2]
    stale = rows[bench.QUICK[0].name]
    assert (stale["loss"], stale["granularity"], stale["block_size"], stale["staleness"]) == \
        ("sampled_token", "block", bench.BLOCK, 1)
    assert rows[bench.QUICK[1].name]["granularity"] == "span"

    # The gate trace of the traced trajectories, read back.
    trace = bench.read_trace(tmp_path / "runs" / bench.QUICK[0].name / "seed0")
    # (1 epoch: each traced trajectory is trained once per step, in one of the 2 mini-batches)
    assert sorted((r["step"], r["trajectory"]) for r in trace) == [(s, b) for s in (0, 1) for b in range(bench.TRACED)]
    assert {(r["epoch"], r["minibatch"]) for r in trace} <= {(0, 0), (0, 1)}
    assert len(bench.drift_by_block(trace)) >= 2
    md = (tmp_path / "report.md").read_text()
    assert "python bench/gate_robustness.py --quick" in md and "| sampled-token OPD + Block16 |" in md

    start = time.perf_counter()  # a second call finds every run cached: no training, the same rows
    again = bench.main(["--quick", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 30
    assert json.loads(json.dumps(again["runs"])) == saved["runs"]
