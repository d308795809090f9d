"""Next-token sampling as SGLang does it: log-probs are log_softmax(logits / T) before any filtering; the token is
drawn from the top-k / top-p filtered, renormalized distribution with the sequence's own generator.
Temperature 0 means greedy and is reported at T = 1 (SGLang sets T = 1, top_k = 1)."""

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


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (tokens [B] int64, logprobs [B, V] = log_softmax(logits / T_b))."""
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], dtype=logits.dtype)
    logprobs = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = torch.empty(len(rows), dtype=torch.int64)
    for b, row in enumerate(rows):
        if row.greedy:
            tokens[b] = torch.argmax(logprobs[b])
        else:
            probs = filtered_probs(logprobs[b], row.top_k, row.top_p)
            tokens[b] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return tokens, logprobs


def filtered_probs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[V] -> probabilities restricted to the top_k most likely tokens and to the smallest prefix (by descending
    probability) whose mass reaches top_p, renormalized."""
    if top_k <= 0 and top_p >= 1.0:
        return logprobs.exp()
    probs, order = torch.sort(logprobs.exp(), descending=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1.0:
        keep &= (torch.cumsum(probs, 0) - probs) < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = probs[keep]
    return out / out.sum()
