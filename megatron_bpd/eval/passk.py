"""Unbiased pass@k (Chen et al. 2021): for a problem with n samples of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(1 when n - c < k). The product form avoids the huge binomials; ``pass_at_k_array`` evaluates it for many problems
at once (a [problems, max c] masked product).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def _check(n: np.ndarray, c: np.ndarray, k: int) -> None:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"pass@k needs an integer k >= 1, got {k!r}")
    if n.shape != c.shape:
        raise ValueError(f"n and c must have the same shape, got {n.shape} and {c.shape}")
    if np.any(n < 1):
        raise ValueError(f"every problem needs n >= 1 samples, got n = {n[n < 1].tolist()[:5]}")
    if np.any(c < 0) or np.any(c > n):
        bad = np.flatnonzero((c < 0) | (c > n))[:5]
        raise ValueError(f"correct counts must satisfy 0 <= c <= n; problems {bad.tolist()}: c = {c[bad].tolist()}, "
                         f"n = {n[bad].tolist()}")
    if np.any(k > n):
        raise ValueError(f"pass@{k} needs at least k = {k} samples per problem, but some problems have only "
                         f"n = {int(n.min())}: sample more (-n >= {k}) or drop k = {k}")


def pass_at_k_array(n: Sequence[int] | np.ndarray | int, c: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Per-problem unbiased pass@k (float64 array). ``n`` is one sample count per problem or a single count."""
    c = np.asarray(c, dtype=np.int64).reshape(-1)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), c.shape) if np.ndim(n) == 0 else \
        np.asarray(n, dtype=np.int64).reshape(-1)
    _check(n, c, k)
    if c.size == 0:
        return np.zeros(0)
    width = max(int(c.max()), 1)
    j = np.arange(width)[None, :]
    i = n[:, None] - j  # n, n - 1, ..., n - c + 1 in the first c columns
    valid = j < c[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(valid, 1.0 - k / np.where(valid, i, 1), 1.0)
    out = 1.0 - np.prod(terms, axis=1)
    out[n - c < k] = 1.0
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem."""
    return float(pass_at_k_array([n], [c], k)[0])


def mean_pass_at_k(n: Sequence[int] | np.ndarray | int, c: Sequence[int] | np.ndarray,
                   ks: Iterable[int]) -> dict[int, float]:
    """``{k: mean over problems of pass@k}`` (0.0 for no problems)."""
    out = {}
    for k in ks:
        values = pass_at_k_array(n, c, k)
        out[int(k)] = float(values.mean()) if values.size else 0.0
    return out
