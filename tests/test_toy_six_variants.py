"""bench/toy_six_variants.py --quick end to end (2 variants x 1 seed x 2 steps, trainer + embedded servers):
the report, JSON and plots are written and every number is a probability with pass@8 >= pass@1."""

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "toy_six_variants.py"


def _load():
    spec = importlib.util.spec_from_file_location("toy_six_variants", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_writes_consistent_results(tmp_path):
    bench = _load()
    result = bench.main(["--quick", "--out", str(tmp_path)])
    for name in ("toy_six_variants.md", "toy_six_variants.json", "toy_six_variants_solve_rate.png",
                 "toy_six_variants_drift_gates.png", "toy_six_variants_gate_distribution.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "toy_six_variants.json").read_text())
    assert saved["meta"]["missing_runs"] == [] and set(saved["variants"]) == set(bench.QUICK_VARIANTS)
    assert set(saved["baselines"]) == {"base student", "teacher"}
    for base in saved["baselines"].values():
        assert 0 <= base["pass@1"] <= base["pass@8"] <= 1
        assert sum(base["correct_per_problem"]) <= base["n_problems"] * base["n_samples"]
    assert saved["baselines"]["teacher"]["pass@1"] >= saved["baselines"]["base student"]["pass@1"]
    for variant, entry in saved["variants"].items():
        for seed, run in entry["per_seed"].items():
            assert 0 <= run["pass@1"] <= run["pass@8"] <= 1, (variant, seed)
            assert run["steps"] == 2
            curves = run["curves"]
            assert all(0 <= v <= 1 for v in curves["solve_rate"])
            assert all(v >= 0 and math.isfinite(v) for v in curves["drift_abs_mean"])
            assert all(0 <= lo <= 1 <= hi for lo, hi in zip(curves["gate_min"], curves["gate_max"]))
        assert entry["pass@1"]["mean"] <= entry["pass@8"]["mean"]
    md = (tmp_path / "toy_six_variants.md").read_text()
    assert "python bench/toy_six_variants.py --quick" in md and "| OPD + Block16 |" in md
    assert result["variants"].keys() == saved["variants"].keys()

    # A second call finds every run (and the baselines) cached: no training, the same numbers.
    start = time.perf_counter()
    again = json.loads(json.dumps(bench.main(["--quick", "--out", str(tmp_path)])["variants"]))
    assert time.perf_counter() - start < 30
    assert again == saved["variants"]
