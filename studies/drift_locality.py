"""Is the drift local? Measures over ``gate_trace.jsonl`` rows (one traced response at one update: ``drift`` =
lp_cur - lp_old per response position, ``response_ids``), the question a block gate's premise rests on.

- ``top_share``: the share of a response's |drift| mass in its top 10% of blocks (at least one block). Under the
  null of no locality (|drift| exchangeable over positions) it is about the blocks' share, so each response is also
  compared with the same statistic after a random permutation of its positions (``permuted_top_share``).
- ``late_share``: the share of a response's |drift| mass in its last quarter of positions. Under the same null
  (exchangeable |drift|) its expectation is exactly that quarter's share of the positions, however heavy the
  tails, so ``late_share`` minus it tests whether drift sits late in a response (the permuted ``top_share`` cannot:
  a few heavy tokens give a high top share at any place).
- ``drift_by_block``: mean |drift| per token at each block index over responses (does drift grow along a
  response?); ``drift_by_line``: the same per solution line (lines end at a newline token).
"""

from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence


def block_masses(drift: Sequence[float], block: int) -> List[float]:
    """|drift| summed over consecutive blocks of ``block`` positions (the last one may be shorter)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [sum(abs(d) for d in drift[i:i + block]) for i in range(0, len(drift), block)]


def top_share(drift: Sequence[float], block: int, fraction: float = 0.1) -> float:
    """Share of the |drift| mass in the ceil(``fraction`` x blocks) blocks with the most (0 when there is none)."""
    masses = sorted(block_masses(drift, block), reverse=True)
    total = sum(masses)
    if total == 0:
        return 0.0
    return sum(masses[:max(1, math.ceil(fraction * len(masses)))]) / total


def permuted_top_share(drift: Sequence[float], block: int, fraction: float = 0.1, seed: int = 0) -> float:
    """``top_share`` of the same values at randomly permuted positions: what no locality would give."""
    values = list(drift)
    random.Random(seed).shuffle(values)
    return top_share(values, block, fraction)


def late_share(drift: Sequence[float], fraction: float = 0.25) -> tuple:
    """(share of the |drift| mass in the last ceil(``fraction`` x n) positions, that span's share of the n positions:
    the share's expectation when |drift| is exchangeable over positions); (0, span share) without drift."""
    n = len(drift)
    span = max(1, math.ceil(fraction * n))
    total = sum(abs(d) for d in drift)
    return (sum(abs(d) for d in drift[n - span:]) / total if total else 0.0), span / n


def drift_by_block(rows: Sequence[dict], block: int) -> List[float]:
    """Mean |drift| per token at each block index, over the responses that reach that block."""
    sums: Dict[int, float] = {}
    counts: Dict[int, int] = {}
    for row in rows:
        for i, d in enumerate(row["drift"]):
            sums[i // block] = sums.get(i // block, 0.0) + abs(d)
            counts[i // block] = counts.get(i // block, 0) + 1
    return [sums[b] / counts[b] for b in sorted(sums)]


def line_ids(response_ids: Sequence[int], newline_ids: Sequence[int]) -> List[int]:
    """The line index of each response position (a newline token ends its line)."""
    out, line = [], 0
    for token in response_ids:
        out.append(line)
        if token in newline_ids:
            line += 1
    return out


def drift_by_line(rows: Sequence[dict], newline_ids: Sequence[int]) -> List[float]:
    """Mean |drift| per token on each solution line, over the responses that reach that line."""
    sums: Dict[int, float] = {}
    counts: Dict[int, int] = {}
    for row in rows:
        for line, d in zip(line_ids(row["response_ids"], newline_ids), row["drift"]):
            sums[line] = sums.get(line, 0.0) + abs(d)
            counts[line] = counts.get(line, 0) + 1
    return [sums[k] / counts[k] for k in sorted(sums)]


def locality(rows: Sequence[dict], block: int, fraction: float = 0.1) -> dict:
    """Per-response ``top_share`` and its permuted null, ``late_share`` and its null, over ``rows`` with any drift:
    ``{"n", "top_share", "null_share", "excess", "late_share", "late_null", "late_excess"}`` (means; ``excess`` =
    top_share - null_share, > 0 when the drift is clustered; ``late_excess`` > 0 when it sits late)."""
    shares, nulls, late, late_null = [], [], [], []
    for i, row in enumerate(rows):
        if any(row["drift"]):
            shares.append(top_share(row["drift"], block, fraction))
            nulls.append(permuted_top_share(row["drift"], block, fraction, seed=i))
            share, expected = late_share(row["drift"])
            late.append(share)
            late_null.append(expected)
    if not shares:
        return {key: None for key in ("top_share", "null_share", "excess", "late_share", "late_null",
                                      "late_excess")} | {"n": 0}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"n": len(shares), "top_share": mean(shares), "null_share": mean(nulls),
            "excess": mean(shares) - mean(nulls), "late_share": mean(late), "late_null": mean(late_null),
            "late_excess": mean(late) - mean(late_null)}
