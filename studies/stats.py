"""Paired-seed statistics of the studies: the mean difference with its 95% t interval, and the minimum detectable
effect (MDE) of the design, without SciPy.

Paired design: arm A and arm B run with the same seeds (same prompts, sampling stream and held-out problems), so
the per-seed differences d_i carry the comparison. With n seeds, mean d and sample sd s:

    95% interval  d +- t_{0.975, n-1} s / sqrt(n)
    MDE           (t_{0.975, n-1} + t_{0.80, n-1}) s / sqrt(n)    (two-sided 5% test, 80% power)
    seeds needed  the smallest n with MDE(n) <= a target effect, at the same s.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Optional, Sequence


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) of Student's t with ``df`` degrees of freedom (Simpson's rule on the density, 2,000 panels)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda t: norm * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    panels = 2000
    h = x / panels
    total = density(0) + density(x) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, panels))
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p (bisection on ``t_cdf``)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mde(sd: float, n: int, power: float = 0.8) -> Optional[float]:
    """Minimum detectable paired effect at a two-sided 5% level and ``power`` (None below 2 seeds)."""
    if n < 2:
        return None
    return (t_quantile(0.975, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_for(effect: float, sd: float, power: float = 0.8, limit: int = 10000) -> Optional[int]:
    """The fewest paired seeds whose MDE is at most ``effect`` at per-seed sd ``sd`` (None beyond ``limit``)."""
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if mde(sd, n, power) <= effect:
            return n
    return None


def paired_summary(differences: Sequence[float]) -> dict:
    """``{"n", "mean", "sd", "ci" ([lo, hi], 95% t), "mde"}`` of per-seed differences (ci/mde None below 2)."""
    n = len(differences)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None, "mde": None}
    mean = statistics.fmean(differences)
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None, "mde": None}
    sd = statistics.stdev(differences)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half], "mde": mde(sd, n)}


def format_paired(summary: dict) -> str:
    """A ``paired_summary`` as one table cell: "+0.030 [+0.010, +0.050] (n=3, MDE 0.040)"; "-" without pairs."""
    if not summary or summary["mean"] is None:
        return "-"
    ci = f" [{summary['ci'][0]:+.3f}, {summary['ci'][1]:+.3f}]" if summary["ci"] else ""
    mde = f", MDE {summary['mde']:.3f}" if summary["mde"] is not None else ""
    return f"{summary['mean']:+.3f}{ci} (n={summary['n']}{mde})"
