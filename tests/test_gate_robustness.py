"""studies/gate_robustness.py --quick end to end (2 configurations x 1 seed x 2 steps: trainer + embedded servers,
one of them with overlapped rollouts k=1): results.json has the issue's fields with probabilities in order, the runs
are archived with relative paths and their gate trace is read back, the report and plots are written, a second call
trains nothing, and --quick refuses docs/."""

import json
import tarfile
from pathlib import Path

import pytest
import yaml

import studies.study
from studies import gate_robustness
from studies.archive import ABSOLUTE, RunArchive

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("variant", "loss", "granularity", "block_size", "reuse_epochs", "staleness", "seed", "pass1", "pass2",
          "greedy", "drift_abs_mean", "gate_min", "gate_std")


@pytest.mark.slow
@pytest.mark.newest_only
def test_quick_writes_consistent_results(tmp_path, monkeypatch):
    bench, study = gate_robustness, gate_robustness.GateRobustness()
    with pytest.raises(SystemExit):
        study.main(["--quick", "--out", str(ROOT / "docs" / "results" / "gate_quick")])
    assert not (ROOT / "docs" / "results" / "gate_quick").exists()

    study.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert not list((tmp_path / "work" / "runs").rglob("*.jsonl"))  # each run left its scratch folder once archived
    tmp_path = tmp_path / "out"
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

    # The runs, archived with relative paths, and the gate trace of the traced trajectories read back.
    with tarfile.open(tmp_path / "runs.tar.xz") as tar:
        names = tar.getnames()
        assert not any(ABSOLUTE.search(tar.extractfile(name).read().decode()) for name in names)
    assert f"{bench.QUICK[0].name}/seed0/gate_trace.jsonl" in names and (tmp_path / "runs.tar.xz").stat().st_size
    archived = RunArchive(tmp_path / "runs.tar.xz").read(f"{bench.QUICK[0].name}/seed0")
    config = yaml.safe_load(archived["files"]["config.yaml"])
    assert config["out"] == f"runs/{bench.QUICK[0].name}/seed0" and config["data"]["prompts"] == "data/prompts.jsonl"
    assert config["model"]["student"] == "megatron_bpd/data/task_models/student"
    trace = bench.read_trace(archived)
    # (1 epoch: each traced trajectory is trained once per step, in one of the 2 mini-batches)
    assert sorted((r["step"], r["trajectory"]) for r in trace) == [(s, b) for s in (0, 1) for b in range(bench.TRACED)]
    assert {(r["epoch"], r["minibatch"]) for r in trace} <= {(0, 0), (0, 1)}
    assert len(bench.drift_by_block(trace)) >= 2
    md = (tmp_path / "report.md").read_text()
    assert "python -m studies.gate_robustness --quick" in md and "| sampled-token OPD + Block16 |" in md

    def no_training(run):
        raise AssertionError(f"{run.out} trained again")

    monkeypatch.setattr(studies.study, "launch", no_training)  # a second call finds every run archived
    again = study.main(["--quick", "--out", str(tmp_path)])
    assert json.loads(json.dumps(again["runs"])) == saved["runs"]
