"""The long-horizon study's bookkeeping on synthetic runs: arms and their references, the results.json row with
the locality measures, paired comparisons with intervals, and the report; and --quick end to end."""

import argparse
import json
from pathlib import Path

import pytest

from studies.long_horizon import GATE_ARMS, Arm, LongHorizon, comparisons, premise_gains, report, reuse_effects, row


def _run(greedy, pass1, pass8, drift):
    evals = [{"step": 0, "student": {"n": 10, "greedy": 0.3, "pass1": 0.25, "pass8": 0.5}, "teacher": {"greedy": 1.0}},
             {"step": 4, "student": {"n": 10, "greedy": greedy, "pass1": pass1, "pass8": pass8}}]
    metrics = [{"step": s, "response_length": 300 + s, "drift_abs_mean": 0.01, "gate_min": 0.5 + 0.1 * s,
                "gate_std": 0.1} for s in range(4)]
    trace = [{"epoch": 0, "minibatch": 0, "drift": [1e-6] * 8, "response_ids": [1] * 8},  # the first update: only
             {"epoch": 0, "minibatch": 1, "drift": drift,                             # rounding, left out
              "response_ids": ([5] * 15 + [9]) * (len(drift) // 16)}]
    return {"evals": evals, "metrics": metrics, "seconds": 60.0,
            "files": {"gate_trace.jsonl": "\n".join(json.dumps(t) for t in trace)}}


def _args(**kw):
    base = dict(horizons=[4, 24], updates=8, lr=[1e-4], gate_lr=None, gates=list(GATE_ARMS), taus=[4.0], split="dev",
                section=["premise", "gate"], quick=False, steps=20, seeds=[0, 1, 2], eval_samples=8,
                command="python -m studies.long_horizon")
    return argparse.Namespace(**{**base, **kw})


def test_arms_sections_and_references():
    study = LongHorizon()
    arms = study.arms(_args())
    names = [a.name for a in arms]
    assert len(names) == len(set(names))  # the premise's long ungated run is the gate section's reference, once
    assert Arm(24, updates=1).schedule() == {"epochs": 1, "minibatches": 1}
    assert Arm(24).schedule() == {"epochs": 4, "minibatches": 2}
    gated = Arm(24, gate="block64", tau=4.0)
    assert gated.reference() == Arm(24) and Arm(24).reference() is None
    assert gated.gate_section() == {"granularity": "block", "block_size": 64, "tau": 4.0}
    assert Arm(24, gate="newline", normalize=False).gate_section() == {"granularity": "span", "tau": 1.0,
                                                                       "normalize": False}
    assert Arm(24, loss="sft").reference() == Arm(24) and Arm(24, loss="sft").gate_section() == {"granularity": "none"}
    assert study.arms(_args(quick=True)) == [Arm(4, updates=1)]
    two = study.arms(_args(lr=[1e-4, 3e-4]))  # each learning rate is a set of arms with its own reference
    assert len(two) == 2 * len(arms) and {a.lr for a in two} == {1e-4, 3e-4}
    assert Arm(24, gate="block16", lr=3e-4).reference() == Arm(24, lr=3e-4)
    some = study.arms(_args(section=["gate"], horizons=[24], lr=[1e-4, 3e-4], gate_lr=[3e-4], gates=["block16", "sft"]))
    assert some == [Arm(24, lr=3e-4), Arm(24, gate="block16", lr=3e-4), Arm(24, loss="sft", lr=3e-4)]


def test_reuse_effect_is_paired_by_seed_within_horizon_and_lr():
    args = _args(section=["premise"], horizons=[24], lr=[1e-4, 3e-4])
    flat = [0.0] * 64
    runs = {}
    for s in range(3):  # at lr 1e-4 reuse helps by 0.1, 0.2, 0.3; at 3e-4 it hurts by 0.05 on every seed
        runs[(Arm(24, updates=1), s)] = _run(0.5, 0.4, 0.7, flat)
        runs[(Arm(24, updates=8), s)] = _run(0.5, 0.5 + 0.1 * s, 0.7, flat)
        runs[(Arm(24, updates=1, lr=3e-4), s)] = _run(0.5, 0.3 + 0.1 * s, 0.7, flat)
        runs[(Arm(24, updates=8, lr=3e-4), s)] = _run(0.5, 0.25 + 0.1 * s, 0.7, flat)
    rows = [row(arm, seed, run, args, newline=[9]) for (arm, seed), run in runs.items()]
    effects = reuse_effects(rows)
    assert set(effects) == {(24, 1e-4, 8), (24, 3e-4, 8)}
    assert effects[(24, 1e-4, 8)]["mean"] == pytest.approx(0.2) and effects[(24, 1e-4, 8)]["n"] == 3
    assert effects[(24, 3e-4, 8)]["mean"] == pytest.approx(-0.05) and effects[(24, 3e-4, 8)]["sd"] < 1e-9
    summary = LongHorizon().summarize(runs, [], args)
    text = report(summary, LongHorizon().arms(args), args)
    assert "| 24 | 0.0003 | 8 | 3 |" in text and "-0.050 [" in text


def test_row_comparisons_and_report():
    args = _args(section=["gate"], horizons=[24])
    local = [0.0] * 64
    local[16:32] = [0.5] * 16  # one 16-token block of 4 holds all the drift
    ref, gated = Arm(24), Arm(24, gate="block64")
    runs = {(ref, s): _run(0.5, 0.40 + 0.01 * s, 0.70, local) for s in range(3)}
    runs.update({(gated, s): _run(0.5, 0.43 + 0.02 * s, 0.72 + 0.01 * s, local) for s in range(3)})
    rows = [row(arm, seed, run, args, newline=[9]) for (arm, seed), run in runs.items()]
    r = rows[0]
    assert r["drift_top10_share"] == pytest.approx(1.0) and r["response_tokens_median"] == 301.5
    assert r["gate_min"] == pytest.approx(0.5) and r["pass8"] == 0.70 and r["n_eval"] == 10
    assert r["drift_by_line"] == pytest.approx([0.0, 0.5, 0.0, 0.0])
    comp = comparisons(rows, [ref, gated])[gated.name]
    assert comp["pass1"]["mean"] == pytest.approx(0.04) and comp["pass1"]["n"] == 3
    assert comp["pass8"]["ci"][0] < 0.03 < comp["pass8"]["ci"][1]  # diffs 0.02, 0.03, 0.04
    summary = {"runs": rows, "table": LongHorizon().summarize(runs, [], args)["table"],
               "comparisons": {gated.name: comp}, "meta": {"missing_runs": []}}
    text = report(summary, [ref, gated], args)
    assert "sampled-token + Block64" in text and "+0.030 [" in text
    assert premise_gains(rows)[(24, 1e-4, 8)]["mean"] == pytest.approx(0.16)


@pytest.mark.slow
@pytest.mark.newest_only
def test_quick_runs_the_long_horizon_path_end_to_end(tmp_path):
    """--quick: one 2-step run of the shipped running-sum pair at the shortest horizon through the trainer and the
    embedded servers; results.json has the issue's fields, the drift trace carries token ids, --quick refuses docs/."""
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        LongHorizon().main(["--quick", "--out", str(root / "docs" / "results" / "long_horizon_quick")])
    summary = LongHorizon().main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    (r,) = summary["runs"]
    fields = ("task", "horizon", "arm", "loss", "granularity", "block_size", "tau", "updates_per_rollout", "seed",
              "split", "n_eval", "greedy", "pass1", "pass8", "response_tokens_median", "drift_top10_share",
              "gate_min", "gate_std")
    assert set(fields) <= set(r) and r["task"] == "running_sum" and r["horizon"] == 4 and r["split"] == "dev"
    assert r["n_eval"] == 8 and 0 <= r["greedy"] <= 1 and 0 <= r["pass1"] <= 1 and r["response_tokens_median"] > 20
    assert (tmp_path / "out" / "report.md").read_text().startswith("# The gate at a long horizon")
