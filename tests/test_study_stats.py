"""The studies' paired statistics against published t quantiles and hand-computed intervals."""

import math
import statistics

import pytest

from studies.stats import mde, paired_summary, seeds_for, t_cdf, t_quantile


@pytest.mark.parametrize("p, df, expected", [(0.975, 1, 12.7062), (0.975, 7, 2.3646), (0.975, 29, 2.0452),
                                             (0.8, 7, 0.8960), (0.95, 4, 2.1318), (0.975, 200, 1.9719)])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-4)
    assert t_cdf(expected, df) == pytest.approx(p, abs=1e-4) and t_quantile(1 - p, df) == pytest.approx(-expected,
                                                                                                          abs=2e-4)


def test_paired_summary_interval_and_mde_by_hand():
    d = [0.02, -0.01, 0.05, 0.03, 0.00, 0.04, 0.01, 0.02]
    s = paired_summary(d)
    sd = statistics.stdev(d)
    half = 2.3646 * sd / math.sqrt(8)
    assert s["n"] == 8 and s["mean"] == pytest.approx(0.02) and s["sd"] == pytest.approx(sd)
    assert s["ci"] == pytest.approx([0.02 - half, 0.02 + half], abs=1e-5)
    assert s["mde"] == pytest.approx((2.3646 + 0.8960) * sd / math.sqrt(8), abs=1e-5)
    assert paired_summary([0.1])["ci"] is None and paired_summary([])["n"] == 0


def test_mde_approaches_the_normal_formula_and_seeds_for_inverts_it():
    assert mde(0.05, 2000) == pytest.approx((1.95996 + 0.84162) * 0.05 / math.sqrt(2000), rel=2e-3)
    n = seeds_for(0.02, 0.05)
    assert mde(0.05, n) <= 0.02 < mde(0.05, n - 1)
    assert mde(0.05, 1) is None
