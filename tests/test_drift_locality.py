"""The drift-locality measures of the long-horizon study against hand-computed values."""

import pytest

from studies.drift_locality import (block_masses, drift_by_block, drift_by_line, late_share, line_ids, locality,
                                    permuted_top_share, top_share)


def test_block_masses_and_top_share_by_hand():
    drift = [0.1, -0.1, 0.0, 0.0, 0.5, -0.5, 0.2]
    assert block_masses(drift, 2) == pytest.approx([0.2, 0.0, 1.0, 0.2])
    assert top_share(drift, 2) == pytest.approx(1.0 / 1.4)  # ceil(0.1 x 4) = 1 block of 4
    assert top_share(drift, 2, fraction=0.5) == pytest.approx(1.2 / 1.4)
    assert top_share([0.0] * 5, 2) == 0.0
    uniform = [0.3] * 40
    assert top_share(uniform, 4) == pytest.approx(0.1) and permuted_top_share(uniform, 4) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="block must be >= 1"):
        block_masses(drift, 0)


def test_local_drift_stands_out_from_its_permuted_null_and_uniform_drift_does_not():
    local = [0.0] * 100 + [1.0] * 10 + [0.0] * 90  # all the drift in one 10-token stretch of 200
    result = locality([{"drift": local}], block=10)
    assert result["top_share"] == pytest.approx(1.0) and result["null_share"] < 0.5 and result["excess"] > 0.5
    flat = locality([{"drift": [0.2] * 200}, {"drift": [0.0] * 50}], block=10)
    assert flat["n"] == 1 and flat["excess"] == pytest.approx(0.0)


def test_drift_by_block_and_by_line():
    rows = [{"drift": [1.0, 1.0, 2.0, 2.0, 4.0], "response_ids": [5, 9, 5, 5, 9]},
            {"drift": [3.0, -3.0], "response_ids": [9, 5]}]
    assert drift_by_block(rows, 2) == pytest.approx([2.0, 2.0, 4.0])
    assert line_ids([5, 9, 5, 5, 9, 5], newline_ids=[9]) == [0, 0, 1, 1, 1, 2]
    # lines: row 0 -> [1, 1], [2, 2, 4]; row 1 -> [3], [-3]
    assert drift_by_line(rows, [9]) == pytest.approx([5.0 / 3, 11.0 / 4])


def test_late_share_against_its_exchangeable_expectation():
    assert late_share([1.0, 0.0, 0.0, 3.0, -1.0]) == pytest.approx((4.0 / 5.0, 2 / 5))  # last ceil(1.25) = 2 of 5
    assert late_share([0.0] * 4) == (0.0, 0.25)
    late = [0.0] * 150 + [0.4] * 50  # all the drift in the last quarter
    early = [0.4] * 50 + [0.0] * 150  # the same values, first quarter
    heavy = [0.0] * 99 + [5.0] + [0.0] * 100  # one heavy token mid-response: a top share of 1 anywhere, not late
    result = locality([{"drift": late}, {"drift": early}], block=10)
    assert result["late_share"] == pytest.approx(0.5) and result["late_excess"] == pytest.approx(0.25)
    one = locality([{"drift": heavy}], block=10)
    assert one["top_share"] == one["null_share"] == 1.0 and one["late_excess"] == pytest.approx(-0.25)
    assert locality([{"drift": [0.0] * 8}], block=4) == {"n": 0, "top_share": None, "null_share": None,
                                                           "excess": None, "late_share": None, "late_null": None,
                                                           "late_excess": None}
