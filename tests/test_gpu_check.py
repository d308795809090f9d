"""scripts/gpu_check.sh where no GPU is: ``--dry-run`` writes the summary with every stage skipped, and the report
reads what a real run leaves behind (stage records, pytest's JUnit XML with recorded numbers, the benches' JSON)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = ["gpu", "env", "transformer_engine", "build", "tests", "bench_block_drift", "bench_vocab_parallel"]
KEYS = {"issue", "dry_run", "started", "finished", "seconds", "budget_s", "commit", "host", "env_mode", "versions",
        "stages", "counts", "tests", "benches"}

sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "bench"))


def test_dry_run_writes_a_flat_summary_with_every_stage_skipped(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.json", "summary.md"]
    s = json.loads((out / "summary.json").read_text())
    assert set(s) == KEYS and s["issue"] == 14 and s["dry_run"] is True
    assert [st["name"] for st in s["stages"]] == STAGES
    assert {st["status"] for st in s["stages"]} == {"skip"} and s["counts"] == {"pass": 0, "fail": 0, "skip": 7}
    assert s["tests"]["cases"] == [] and s["benches"] == {"bench_block_drift": None, "bench_vocab_parallel": None}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (issue 14) - dry run") and "| bench_vocab_parallel | skip | 0 |" in summary


def test_bad_arguments_print_the_usage(tmp_path):
    for args in ([], ["--dry-run"], ["a", "b"], ["--fast", str(tmp_path)]):
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "usage: bash scripts/gpu_check.sh" in result.stderr, args


SAMPLE_TESTS = '''
import pytest

def test_ok(record_property):
    record_property("max_abs_err", 1.5e-7)

def test_bad():
    assert 1 == 2

def test_skipped():
    pytest.skip("needs a CUDA device")
'''


def test_report_reads_stages_junit_xml_and_bench_rows(tmp_path):
    from bench_block_drift import json_rows
    from gpu_check_report import main

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "test_sample.py").write_text(SAMPLE_TESTS)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    f"--junitxml={out / 'tests.xml'}", "test_sample.py"], cwd=tmp_path, capture_output=True,
                   timeout=120)
    (out / "bench_block_drift.json").write_text(json.dumps(json_rows(
        [("NVIDIA H200", 1000000, (0.02, 0.019), (1.5, 1.4), (0.01, 0.009), (0.005, 0.004))])))
    vocab_rows = [dict(vocab=151936, n=4096, tp=1, op="logprobs_at", path=path, seconds=t, mib=m, grad_mib=2374.0,
                       comm_per_pos=0.0, device="cuda:0") for path, t, m in (("ours", 0.006, 2400.0),
                                                                              ("megatron CE", 0.005, 2380.0),
                                                                              ("naive", 0.012, 7200.0))]
    (out / "bench_vocab_parallel.json").write_text(json.dumps(vocab_rows))
    stages = tmp_path / "stages.tsv"
    stages.write_text("gpu\tpass\t1\t\nbuild\tfail\t30\texit code 1 (see gpu_check.log)\ntests\tskip\t0\tno Python\n")
    main(["--out", str(out), "--stages", str(stages), "--versions", str(tmp_path / "missing.json"),
          "--seconds", "31", "--budget", "540"])

    s = json.loads((out / "summary.json").read_text())
    assert set(s) == KEYS and s["versions"] is None and s["dry_run"] is False
    assert s["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert s["stages"][1] == {"name": "build", "status": "fail", "seconds": 30,
                              "detail": "exit code 1 (see gpu_check.log)"}
    cases = {c["id"].split("::")[-1]: c for c in s["tests"]["cases"]}
    assert s["tests"]["counts"] == {"pass": 1, "fail": 1, "skip": 1}
    assert cases["test_ok"]["properties"] == {"max_abs_err": "1.5e-07"}
    assert "assert 1 == 2" in cases["test_bad"]["message"] and "needs a CUDA device" in cases["test_skipped"]["message"]
    (row,) = s["benches"]["bench_block_drift"]
    assert row["ref_over_ext"] == 75.0 and row["ext_over_copy"] == 2.0 and s["benches"]["bench_vocab_parallel"] == \
        vocab_rows
    summary = (out / "summary.md").read_text()
    assert "| NVIDIA H200 | 1e+06 | 0.02 | 1.5 | 0.01 | 75 | 2 |" in summary
    assert "max_abs_err=1.5e-07" in summary and "| build | fail | 30 |" in summary
    assert "| 151936 | 4096 | 1 | logprobs_at | ours | 0.006 | 1.2 | 2400 | 0.333 | 0 |" in summary
