"""A step's rollout as per-trajectory arrays, and the padded micro-batches the schedule consumes.

Trajectory b has prompt x (P_b tokens) and response y (T_b tokens). Every per-response array here is ``[T_b]``
(``[T_b, K]`` for top-K); in a micro-batch, response token t sits at label position P_b - 1 + t, because the
model's logits at input position i score token i + 1.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..gating import GateConfig, newline_span_starts, plan_segments
from ..rollout.types import TeacherScores, TrajectoryBatch
from .batch import MicroBatch


@dataclass
class RolloutData:
    """Everything the loss needs about a step's trajectories (identical on every rank but ``old_logprobs`` and
    in-trainer teacher scores, which only the last pipeline stage computes and uses)."""

    trajectories: TrajectoryBatch
    teacher: Optional[TeacherScores] = None
    old_logprobs: Dict[int, torch.Tensor] = field(default_factory=dict)

    def response_mask(self, b: int) -> torch.Tensor:
        return torch.tensor(self.trajectories.loss_mask[b], dtype=torch.bool)

    def num_tokens(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.tensor(sum(sum(self.trajectories.loss_mask[b]) for b in rows), dtype=torch.int64)


def padded_length(data: RolloutData, rows: Sequence[int], multiple: int) -> int:
    """Label positions of the longest trajectory of ``rows``, rounded up to ``multiple``."""
    longest = max(len(data.trajectories.prompt_ids[b]) + len(data.trajectories.response_ids[b]) - 1 for b in rows)
    return -(-longest // multiple) * multiple


def micro_batch(data: RolloutData, rows: Sequence[int], seq_len: int, gate: GateConfig, *, pad_id: int = 0,
                newline_ids: Sequence[int] = (), with_old: bool = True, with_behavior: bool = False) -> MicroBatch:
    """The padded ``[len(rows), seq_len]`` micro-batch of trajectories ``rows`` (plan of the gate included; with
    ``with_behavior`` the sampler's log-probs too)."""
    traj, teacher = data.trajectories, data.teacher
    n = len(rows)
    tokens = torch.full((n, seq_len + 1), pad_id, dtype=torch.int64)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    old = torch.zeros(n, seq_len)
    behavior = torch.zeros(n, seq_len) if with_behavior else None
    starts = torch.zeros(n, dtype=torch.int64)
    k = teacher.top_k if teacher is not None else 0
    teacher_lp, top_ids, top_lp = torch.zeros(n, seq_len), torch.zeros(n, seq_len, max(k, 1), dtype=torch.int64), \
        torch.zeros(n, seq_len, max(k, 1))
    for i, b in enumerate(rows):
        sequence = traj.prompt_ids[b] + traj.response_ids[b]
        if len(sequence) - 1 > seq_len:
            raise ValueError(f"trajectory {b} has {len(sequence) - 1} label positions, micro-batch length {seq_len}")
        tokens[i, :len(sequence)] = torch.tensor(sequence)
        p, t = len(traj.prompt_ids[b]), len(traj.response_ids[b])
        span = slice(p - 1, p - 1 + t)
        starts[i] = p - 1
        mask[i, span] = data.response_mask(b)
        if with_old:
            old[i, span] = data.old_logprobs[b]
        if with_behavior:
            behavior[i, span] = torch.tensor(traj.behavior_logprobs[b])
        if teacher is not None:
            teacher_lp[i, span] = teacher.token_logprobs[b]
            top_ids[i, span] = teacher.topk_ids[b]
            top_lp[i, span] = teacher.topk_logprobs[b]
    labels = tokens[:, 1:]
    span_starts = None
    if gate.granularity == "span":
        span_starts = newline_span_starts(labels, newline_ids, min_len=gate.span_min_len, max_len=gate.span_max_len,
                                          fallback_block=gate.span_fallback_block, response_starts=starts)
    plan = plan_segments((n, seq_len), gate, response_starts=starts, span_starts=span_starts)
    return MicroBatch(tokens=tokens[:, :-1], labels=labels, loss_mask=mask, old_logprobs=old,
                      segment_ids=plan.segment_ids, plan=plan,
                      teacher_logprobs=teacher_lp if teacher is not None else None,
                      teacher_topk_ids=top_ids if teacher is not None else None,
                      teacher_topk_logprobs=top_lp if teacher is not None else None, behavior_logprobs=behavior)


def response_slices(data: RolloutData, rows: Sequence[int], per_position: torch.Tensor) -> List[torch.Tensor]:
    """Cut label-aligned ``[len(rows), seq_len, ...]`` values back into per-trajectory ``[T_b, ...]`` arrays."""
    out = []
    for i, b in enumerate(rows):
        p, t = len(data.trajectories.prompt_ids[b]), len(data.trajectories.response_ids[b])
        out.append(per_position[i, p - 1:p - 1 + t])
    return out


def newline_token_ids(tokenizer) -> List[int]:
    """Vocabulary ids whose text contains a newline (the NewlineSpan boundaries)."""
    return [i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])]
