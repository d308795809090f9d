"""Trajectory batches and teacher scores, with the packed and padded tensor views the trainer consumes.

Alignment convention of every tensor view: position i refers to token i of the sequence ``prompt + response``.
``loss_mask[i] = 1`` marks a response token that is trained on, and ``behavior_logprobs[i]`` is
log pi_old(token_i | tokens_<i). The trainer's logits at position i - 1 predict token i (shift before use).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from megatron_bpd.rollout.protocol import FINISH_REASONS


@dataclass
class PackedBatch:
    """Sequences concatenated without padding (THD layout). N = total tokens, B = sequences."""

    tokens: torch.Tensor  # [N] int64
    position_ids: torch.Tensor  # [N] int64, restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # [B + 1] int32, sequence b occupies [cu_seqlens[b], cu_seqlens[b + 1])
    loss_mask: torch.Tensor  # [N] float32
    behavior_logprobs: torch.Tensor  # [N] float32, 0 outside the response


@dataclass
class PaddedBatch:
    """Sequences right-padded to the longest one. L = longest prompt + response."""

    tokens: torch.Tensor  # [B, L] int64, pad_id beyond each sequence
    attention_mask: torch.Tensor  # [B, L] bool
    loss_mask: torch.Tensor  # [B, L] float32
    behavior_logprobs: torch.Tensor  # [B, L] float32


@dataclass
class TrajectoryBatch:
    """A rollout: B = prompts x samples trajectories; lists are indexed by trajectory.

    ``finish_reason`` is "stop", "length" (truncated) or "abort"; truncated and aborted trajectories are kept.
    ``temperature`` is the sampling temperature: behavior log-probs are log_softmax(logits / temperature).
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    behavior_logprobs: list[list[float]]
    loss_mask: list[list[int]]
    finish_reason: list[str]
    weight_version: list[str | None]
    prompt_index: list[int]  # which prompt a trajectory was sampled from (its group)
    temperature: float = 1.0

    def __post_init__(self):
        n = len(self.prompt_ids)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"TrajectoryBatch.{f.name} has {len(value)} entries, expected {n}")
        for b, (resp, lps, mask) in enumerate(zip(self.response_ids, self.behavior_logprobs, self.loss_mask)):
            if not len(resp) == len(lps) == len(mask):
                raise ValueError(f"trajectory {b}: {len(resp)} response tokens, {len(lps)} log-probs, "
                                 f"{len(mask)} mask entries")
        bad = set(self.finish_reason) - set(FINISH_REASONS)
        if bad:
            raise ValueError(f"unknown finish reasons {sorted(bad)}; expected {FINISH_REASONS}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> list[int]:
        """Total tokens (prompt + response) of each trajectory."""
        return [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    def select(self, indices: Sequence[int]) -> "TrajectoryBatch":
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return TrajectoryBatch(pick(self.prompt_ids), pick(self.response_ids), pick(self.behavior_logprobs),
                               pick(self.loss_mask), pick(self.finish_reason), pick(self.weight_version),
                               pick(self.prompt_index), self.temperature)

    def _rows(self):
        """Per trajectory: (tokens, loss_mask, behavior_logprobs) over prompt + response positions."""
        for prompt, resp, lps, mask in zip(self.prompt_ids, self.response_ids, self.behavior_logprobs, self.loss_mask):
            pad = [0] * len(prompt)
            yield prompt + resp, pad + list(mask), [0.0] * len(prompt) + list(lps)

    def to_packed(self) -> PackedBatch:
        rows = list(self._rows())
        lengths = torch.tensor([len(r[0]) for r in rows], dtype=torch.int64)
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        return PackedBatch(
            tokens=torch.tensor([t for r in rows for t in r[0]], dtype=torch.int64),
            position_ids=torch.arange(int(cu[-1])) - starts,
            cu_seqlens=cu,
            loss_mask=torch.tensor([m for r in rows for m in r[1]], dtype=torch.float32),
            behavior_logprobs=torch.tensor([lp for r in rows for lp in r[2]], dtype=torch.float32),
        )

    def to_padded(self, pad_id: int = 0) -> PaddedBatch:
        rows = list(self._rows())
        length = max((len(r[0]) for r in rows), default=0)
        out = PaddedBatch(tokens=torch.full((len(rows), length), pad_id, dtype=torch.int64),
                          attention_mask=torch.zeros(len(rows), length, dtype=torch.bool),
                          loss_mask=torch.zeros(len(rows), length), behavior_logprobs=torch.zeros(len(rows), length))
        for b, (tokens, mask, lps) in enumerate(rows):
            n = len(tokens)
            out.tokens[b, :n] = torch.tensor(tokens)
            out.attention_mask[b, :n] = True
            out.loss_mask[b, :n] = torch.tensor(mask, dtype=torch.float32)
            out.behavior_logprobs[b, :n] = torch.tensor(lps)
        return out


@dataclass
class TeacherScores:
    """Teacher log-probs on the response tokens of a TrajectoryBatch, at temperature 1.

    For trajectory b with T_b response tokens y: ``token_logprobs[b][t] = log q(y_t | x, y_<t)`` ([T_b]) and
    ``topk_ids[b][t]`` / ``topk_logprobs[b][t]`` are the teacher's K most likely next tokens at that position and
    their log-probs ([T_b, K], descending). Any teacher (an SGLang server or the model inside the trainer)
    produces this type.
    """

    token_logprobs: list[torch.Tensor]
    topk_ids: list[torch.Tensor]
    topk_logprobs: list[torch.Tensor]

    def __post_init__(self):
        if not len(self.token_logprobs) == len(self.topk_ids) == len(self.topk_logprobs):
            raise ValueError("TeacherScores fields must have one entry per trajectory")
        for b, (lp, ids, tlp) in enumerate(zip(self.token_logprobs, self.topk_ids, self.topk_logprobs)):
            if lp.dim() != 1 or ids.shape != tlp.shape or ids.dim() != 2 or ids.shape[0] != lp.shape[0]:
                raise ValueError(f"trajectory {b}: token_logprobs {tuple(lp.shape)}, topk_ids {tuple(ids.shape)}, "
                                 f"topk_logprobs {tuple(tlp.shape)} are not [T], [T, K], [T, K]")

    @property
    def top_k(self) -> int:
        return self.topk_ids[0].shape[1] if self.topk_ids else 0

    def select(self, indices: Sequence[int]) -> "TeacherScores":
        return TeacherScores([self.token_logprobs[i] for i in indices], [self.topk_ids[i] for i in indices],
                             [self.topk_logprobs[i] for i in indices])

    @classmethod
    def from_packed(cls, batch: TrajectoryBatch, token_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                    topk_logprobs: torch.Tensor) -> "TeacherScores":
        """The inverse of ``to_packed``: a teacher inside the trainer computes [N], [N, K], [N, K] on the layout of
        ``batch.to_packed()`` (position i scores token i, from the logits at i - 1) and keeps the response part."""
        cu = batch.to_packed().cu_seqlens.tolist()
        spans = [slice(cu[b + 1] - len(r), cu[b + 1]) for b, r in enumerate(batch.response_ids)]
        return cls([token_logprobs[s] for s in spans], [topk_ids[s] for s in spans], [topk_logprobs[s] for s in spans])

    def to_packed(self, batch: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Place the scores at the response positions of ``batch.to_packed()``: ([N], [N, K] ids, [N, K]);
        zeros at prompt positions."""
        if len(batch) != len(self.token_logprobs):
            raise ValueError(f"TeacherScores has {len(self.token_logprobs)} trajectories, batch has {len(batch)}")
        parts = ([], [], [])
        for b, prompt in enumerate(batch.prompt_ids):
            if self.token_logprobs[b].shape[0] != len(batch.response_ids[b]):
                raise ValueError(f"trajectory {b}: {self.token_logprobs[b].shape[0]} teacher scores for "
                                 f"{len(batch.response_ids[b])} response tokens")
            p, k = len(prompt), self.top_k
            parts[0].extend([torch.zeros(p), self.token_logprobs[b].float()])
            parts[1].extend([torch.zeros(p, k, dtype=torch.int64), self.topk_ids[b].long()])
            parts[2].extend([torch.zeros(p, k), self.topk_logprobs[b].float()])
        return tuple(torch.cat(part) for part in parts)
