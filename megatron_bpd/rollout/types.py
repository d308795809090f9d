"""A rollout's trajectories and a teacher's scores of them, as per-trajectory lists (the trainer places them on
label positions: ``train.rollout_data``).

Every per-response array of trajectory b has one entry per response token y_t: ``behavior_logprobs[b][t]`` is
log pi_behavior(y_t | x, y_<t) and ``loss_mask[b][t] = 1`` marks a token that is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from megatron_bpd.rollout.protocol import FINISH_REASONS


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

    def select(self, indices: Sequence[int]) -> "TrajectoryBatch":
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return TrajectoryBatch(pick(self.prompt_ids), pick(self.response_ids), pick(self.behavior_logprobs),
                               pick(self.loss_mask), pick(self.finish_reason), pick(self.weight_version),
                               pick(self.prompt_index), self.temperature)


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
