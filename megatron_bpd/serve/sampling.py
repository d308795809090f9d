"""Next-token sampling as SGLang does it, for a whole batch in a few tensor ops.

Log-probs are log_softmax(logits / T) over the full vocabulary, before any filtering; temperature 0 means greedy and
is reported at T = 1 (SGLang sets T = 1, top_k = 1). A sampled row draws its token by inverse CDF: with p the
row's probabilities sorted descending (a stable sort), keep rank r when r < top_k and sum(p[:r]) < top_p, and take
the first kept rank whose cumulative kept mass exceeds u * (total kept mass), u ~ U[0, 1). Rows without filters
(top_k = -1, top_p = 1) skip the ranking and walk the vocabulary in id order. u is the sequence's own stream: token t
of a sequence uses the t-th number its seeded generator drew at admission, so the token stream depends only on the
request's seed and logits, never on the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingRow:
    """Per-sequence sampling settings; ``top_k = -1`` and ``top_p = 1`` disable the filters."""

    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (unnormalized, >= 0), u [R] in [0, 1) -> [R] int64: the first index whose cumulative mass
    exceeds u * total (never an index of zero mass)."""
    cdf = torch.cumsum(probs, dim=1)
    index = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_(max=probs.shape[1] - 1)


def filtered_sample(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor,
                    candidates: int = 64) -> torch.Tensor:
    """logprobs [R, V], top_k [R] (<= 0: off), top_p [R], u [R] -> token ids [R] drawn from the top-k / top-p
    filtered distribution (see the module docstring). A row whose kept set lies within its ``candidates`` most
    likely tokens (top_k <= candidates, or their mass reaches top_p) ranks only those (topk), the others sort the
    whole row; which path a row takes depends on that row alone."""
    probs = logprobs.exp()
    ranked, order = torch.topk(probs, min(candidates, probs.shape[1]))
    whole = ~(((top_k > 0) & (top_k <= ranked.shape[1])) | (ranked.sum(1) >= top_p))
    tokens = _kept_sample(ranked, order, top_k, top_p, u)
    if bool(whole.any()):
        rows = whole.nonzero()[:, 0]
        ranked, order = torch.sort(probs[rows], dim=1, descending=True, stable=True)
        tokens[rows] = _kept_sample(ranked, order, top_k[rows], top_p[rows], u[rows])
    return tokens


def _kept_sample(ranked: torch.Tensor, order: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """ranked [R, K] probabilities sorted descending with their ids ``order`` [R, K] -> ids [R]: rank r is kept when
    r < top_k and sum(ranked[:r]) < top_p; inverse CDF over the kept ranks."""
    rank = torch.arange(ranked.shape[1])
    keep = rank[None, :] < torch.where(top_k > 0, top_k, ranked.shape[1])[:, None]
    keep &= (torch.cumsum(ranked, dim=1) - ranked) < top_p[:, None]
    return order.gather(1, inverse_cdf(ranked * keep, u)[:, None])[:, 0]


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 and per-row settings [B] (temperature 0: greedy) -> (tokens [B] int64,
    logprobs [B, V] = log_softmax(logits / T_b), T_b = 1 for greedy rows)."""
    greedy = (temperature == 0) | (top_k == 1)
    temps = torch.where(temperature > 0, temperature, 1.0).to(logits.dtype)
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.argmax(logprobs, dim=-1)
    if bool(greedy.all()):
        return tokens, logprobs
    filtered = ~greedy & ((top_k > 0) | (top_p < 1))
    plain = ~greedy & ~filtered
    if bool(plain.any()):
        rows = plain.nonzero()[:, 0]
        tokens[rows] = inverse_cdf(logprobs[rows].exp(), u[rows])
    if bool(filtered.any()):
        rows = filtered.nonzero()[:, 0]
        tokens[rows] = filtered_sample(logprobs[rows], top_k[rows], top_p[rows], u[rows])
    return tokens, logprobs


class SlotSampling:
    """The sampling settings of ``slots`` decoding slots as tensors, so that a step samples every running row at once.

    ``assign(slot, row, steps)`` stores a sequence's settings and draws its ``steps`` uniforms from its generator;
    ``copy(src, dst)`` moves sequences to other slots; ``sample(logits, slots)`` samples the rows ``slots`` [B]
    (row b's t-th call uses its t-th uniform)."""

    def __init__(self, slots: int):
        self.temperature = torch.zeros(slots)
        self.top_k = torch.full((slots,), -1, dtype=torch.int64)
        self.top_p = torch.ones(slots)
        self.step = torch.zeros(slots, dtype=torch.int64)
        self.uniforms = torch.zeros(slots, 1, dtype=torch.float64)

    def assign(self, slot: int, row: SamplingRow, steps: int) -> None:
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = row.temperature, row.top_k, row.top_p
        self.step[slot] = 0
        if row.greedy:
            return
        if steps > self.uniforms.shape[1]:
            grown = torch.zeros(self.uniforms.shape[0], max(steps, 2 * self.uniforms.shape[1]), dtype=torch.float64)
            grown[:, : self.uniforms.shape[1]] = self.uniforms
            self.uniforms = grown
        self.uniforms[slot, :steps] = torch.rand(steps, generator=row.generator, dtype=torch.float64)

    def copy(self, src: list[int], dst: list[int]) -> None:
        """Give slots ``dst`` the settings and uniform streams (at their current step) of slots ``src``."""
        src_index, dst_index = torch.tensor(src), torch.tensor(dst)
        for state in (self.temperature, self.top_k, self.top_p, self.step, self.uniforms):
            state[dst_index] = state[src_index]

    def sample(self, logits: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] of the rows in ``slots`` [B] -> (tokens [B], logprobs [B, V]); advances their streams."""
        step = self.step[slots].clamp_(max=self.uniforms.shape[1] - 1)
        u = self.uniforms[slots, step]
        self.step[slots] += 1
        return sample(logits, self.temperature[slots], self.top_k[slots], self.top_p[slots], u)
