"""studies/opd_regime.py on archived runs (no training): the table's means, gains and the paired comparison against
the control are the arithmetic of the per-run evaluations, the report states the schedule it was given, a study
without runs reports from its archived summary, and --quick refuses docs/. The trainer path it launches is covered
end to end by test_gate_robustness and test_demo."""

import json
from pathlib import Path

import pytest

from studies import opd_regime
from studies.archive import RunArchive

ROOT = Path(__file__).resolve().parents[1]

# (variant, seed) -> (greedy, pass1, support KL) at the end; every run starts from the same base student.
BASE = (0.40, 0.30, 0.080)
FINAL = {("sampled_token", 0): (0.60, 0.50, 0.050), ("sampled_token", 1): (0.70, 0.52, 0.040),
         ("sft_control", 0): (0.65, 0.45, 0.060), ("sft_control", 1): (0.60, 0.40, 0.070)}


def _evaluation(step, greedy, pass1, kl):
    scores = {"n": 100, "greedy": greedy, "greedy_ci": [greedy - 0.1, greedy + 0.1], "pass1": pass1,
              "pass1_ci": [pass1 - 0.1, pass1 + 0.1]}
    return {"step": step, "student": scores, "teacher": {**scores, "greedy": 0.99, "pass1": 0.9}, "support_kl": kl}


MACHINE = {"machine.json": json.dumps({"machine": "m68k", "python": "2.7.18"})}  # where the runs trained


def _archive_runs(out: Path):
    RunArchive(out / "runs.tar.xz").put(MACHINE | {
        f"{variant}/seed{seed}/{name}": text for (variant, seed), final in FINAL.items() for name, text in (
            ("run.json", json.dumps({"seconds": 300.0 + seed})),
            ("evals.jsonl", "\n".join(json.dumps(_evaluation(s, *v)) for s, v in ((0, BASE), (10, final))) + "\n"))})


def test_report_from_archived_runs(tmp_path):
    study = opd_regime.OPDRegime()
    with pytest.raises(SystemExit):
        study.main(["--quick", "--out", str(ROOT / "docs" / "results" / "opd_quick")])
    assert not (ROOT / "docs" / "results" / "opd_quick").exists()

    _archive_runs(tmp_path)
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "--variants", "sampled_token", "sft_control",
            "--steps", "10", "--epochs", "2", "--minibatches", "4", "--lr", "1e-4", "--adv-clip", "1"]
    summary = study.main(argv)  # every run is archived: nothing trains

    token, control = summary["table"]["sampled_token"], summary["table"]["sft_control"]
    assert token["greedy"]["mean"] == pytest.approx(0.65) and token["greedy"]["n"] == 2
    assert token["greedy"]["std"] == pytest.approx(0.0707107, abs=1e-6)
    assert token["gain_pass1"]["mean"] == pytest.approx(0.51 - 0.30)
    assert control["gain_greedy"]["mean"] == pytest.approx(0.625 - 0.40)
    assert token["support_kl"]["mean"] == pytest.approx(0.045)
    pass1 = opd_regime.paired_variants(summary, "sampled_token", "sft_control", "pass1")
    assert pass1["diffs"] == pytest.approx([0.05, 0.12]) and pass1["seeds"] == [0, 1]

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (tmp_path / "eval_curves.png").stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# On-policy distillation") and f"python -m studies.opd_regime --out {tmp_path} --seeds" in md
    assert "**Machine:** m68k CPU, OMP_NUM_THREADS=1, Python 2.7.18." in md  # the archive's, not this machine's
    assert "2 epoch(s) x 4 mini-batches" in md and "(8 optimizer updates per rollout batch)" in md
    assert "Adam lr 0.0001, sampled-token advantage\nclamp 1," in md
    assert "| sampled-token OPD | 2 | 0.650 ± 0.071 | 0.510 ± 0.014 | +0.250 ± 0.071 | +0.210 ± 0.014 |" in md
    assert "sampled-token OPD - control, pass1: +0.085 ± 0.049 (per seed: +0.050, +0.120)" in md

    # A study whose runs were not kept: its archive holds results.json, which the report is made from again.
    other = tmp_path / "summary_only"
    RunArchive(other / "runs.tar.xz").put(MACHINE | {"results.json": json.dumps(summary)})
    again = study.main(argv[:1] + [str(other), "--report-only"] + argv[2:])
    assert again == saved and (other / "report.md").read_text() == md.replace(
        f"--out {tmp_path} ", f"--out {other} --report-only ")
    assert (other / "eval_curves.png").read_bytes() == (tmp_path / "eval_curves.png").read_bytes()
