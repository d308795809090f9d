"""The drift-control head-to-head's bookkeeping: every arm is a valid trainer config with the settings its source
needs (pi_old, the control, the schedule), the references each arm is paired with, the results.json row, paired
comparisons and the report on synthetic runs; and --quick end to end through the trainer."""

import argparse
import json

import pytest

from megatron_bpd.experiment import TaskRun
from megatron_bpd.train.config import TrainConfig, from_dict
from studies.drift_controls import ARMS, REGIMES, Arm, DriftControls, arms_of, comparisons, report, row


def _config(arm: Arm) -> TrainConfig:
    base = TaskRun(out="o", student="s", teacher="t", prompts="p", eval_prompts="e")
    return from_dict(TrainConfig, base.replace(gate=arm.gate_section(), overrides=arm.settings()).config())


def test_every_arm_is_a_valid_config_with_its_sources_settings():
    arms = arms_of(list(REGIMES))
    # at k = 0 no "proximal" arm (it is "none") and of the no-op controls on pi_old / pi_behavior only ICE-POP
    assert len(arms) == 3 * len(ARMS) - 4
    assert [a.control for a in arms if a.regime == "reuse"] == ["none", "gate", "token_drop", "icepop",
                                                                 "advantage_current"]
    for arm in arms:
        c, regime = _config(arm), REGIMES[arm.regime]
        assert (c.reuse.epochs * c.reuse.minibatches, c.rollout.max_staleness, c.optimizer.lr) == \
            (regime.epochs * regime.minibatches, regime.staleness, regime.lr)
        assert c.loss.drift_control.kind == (arm.control if arm.control in ("token_drop", "icepop", "tis", "seq_mask",
                                                                            "m2po") else "none")
        assert c.loss.advantage_from == ("current" if arm.control == "advantage_current" else "old")
        assert (c.loss.gate.granularity == "block") == (arm.control == "gate")
    stale = {a.control: _config(a).reuse.old_logprobs for a in arms if a.regime == "stale4"}
    assert stale == {"none": "rollout", "proximal": "recompute", "gate": "rollout", "token_drop": "rollout",
                     "icepop": "recompute", "tis": "recompute", "seq_mask": "recompute", "m2po": "recompute",
                     "advantage_current": "rollout"}
    assert {a.control for a in arms if a.regime == "reuse" and _config(a).reuse.old_logprobs != "recompute"} == set()


def test_references():
    assert Arm("stale4").references() == []
    assert Arm("stale4", "tis").references() == [Arm("stale4"), Arm("stale4", "proximal")]
    assert Arm("stale4", "token_drop").references() == [Arm("stale4")]
    assert Arm("stale4", "proximal").references() == [Arm("stale4")]
    assert Arm("reuse", "tis").references() == [Arm("reuse")]  # k = 0: proximal is none


def _run(pass1, masked=None):
    evals = [{"step": 0, "student": {"n": 10, "greedy": 0.4, "pass1": 0.3, "pass8": 0.6}},
             {"step": 20, "student": {"n": 10, "greedy": pass1 + 0.1, "pass1": pass1, "pass8": 0.8}}]
    metrics = [{"step": s, "drift_abs_mean": 0.01, **({} if masked is None else
                {"drift_masked_frac": masked, "drift_weight_mean": 0.9, "drift_weight_max": 1.5 + s})}
               for s in range(3)]
    return {"evals": evals, "metrics": metrics, "seconds": 100.0, "files": {}}


def test_row_comparisons_and_report():
    args = argparse.Namespace(regimes=["stale4"], controls=list(ARMS), quick=False, split="test", steps=20,
                              seeds=[0, 1, 2], eval_problems=10, eval_samples=8,
                              command="python -m studies.drift_controls")
    none, prox, tis = Arm("stale4"), Arm("stale4", "proximal"), Arm("stale4", "tis")
    runs = {(none, s): _run(0.1 + 0.01 * s) for s in range(3)}
    runs.update({(prox, s): _run(0.3 + 0.01 * s) for s in range(3)})
    runs.update({(tis, s): _run(0.32 + 0.02 * s, masked=0.05) for s in range(3)})
    rows = [row(arm, seed, run) for (arm, seed), run in runs.items()]
    r = rows[-1]
    assert (r["weight_max"], r["control"], r["n_eval"]) == (3.5, "tis", 10) and r["masked_frac"] == pytest.approx(0.05)
    assert rows[0]["masked_frac"] is None
    comp = comparisons(rows, [none, prox, tis])
    assert set(comp) == {"stale4-proximal vs none", "stale4-tis vs none", "stale4-tis vs proximal"}
    assert comp["stale4-tis vs proximal"]["pass1"]["mean"] == pytest.approx(0.03)
    assert comp["stale4-tis vs none"]["pass1"]["ci"][0] < 0.23 < comp["stale4-tis vs none"]["pass1"]["ci"][1]
    summary = DriftControls().summarize(runs, [], args)
    text = report(summary, [none, prox, tis], args)
    assert "## stale4: 2 updates per rollout, lr 0.0003, staleness k = 4" in text
    assert "| TIS (verl, slime) | proximal pi_old (recompute) | +0.000 [+0.000, +0.000] (n=3, MDE 0.000) | +0.030 [" \
        in text and "Every planned run is in" in text and "| M2PO |" not in text  # no run: no row


@pytest.mark.slow
@pytest.mark.newest_only
def test_quick_runs_a_control_end_to_end(tmp_path):
    """--quick: one 2-step run (token drop at staleness 2) through the trainer and the embedded servers."""
    summary = DriftControls().main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    (r,) = summary["runs"]
    assert (r["regime"], r["control"], r["n_eval"]) == ("stale2", "token_drop", 8)
    assert 0 <= r["masked_frac"] <= 1 and 0 <= r["pass1"] <= 1 and r["pass8"] is None  # --quick: 2 samples
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["split"] == "test"
