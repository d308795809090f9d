"""The micro-batch the distillation loss consumes, and its context-parallel split."""

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..gating import SegmentPlan
from ..parallel.context_parallel import cp_positions, split_for_cp


@dataclass
class MicroBatch:
    """One padded micro-batch, aligned on label positions: position t scores token ``labels[:, t]`` from the
    logits the model produces at input position t (``labels`` are the inputs shifted left by one).

    tokens, labels, position_ids: ``[b, s]`` int64; loss_mask: ``[b, s]`` bool (response tokens sampled by the
    student); segment_ids: ``[b, s]`` the gate's segments (``plan.segment_ids`` or a CP rank's share of it);
    old_logprobs: ``[b, s]`` log-probs of the labels under pi_old (None in the no-grad scoring passes, which do not
    read them); teacher_logprobs ``[b, s]`` (sampled-token loss) or teacher_topk_ids / teacher_topk_logprobs
    ``[b, s, K]`` (LSM loss); train_mask ``[b, s]`` bool: the positions the loss trains on when a filter (the
    top-entropy one) keeps only some of ``loss_mask`` (None: all); behavior_logprobs ``[b, s]``: the sampler's
    log-probs (the rollout's), read by ``loss.drift_control``.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    segment_ids: torch.Tensor
    plan: SegmentPlan
    old_logprobs: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[torch.Tensor] = None
    teacher_topk_ids: Optional[torch.Tensor] = None
    teacher_topk_logprobs: Optional[torch.Tensor] = None
    train_mask: Optional[torch.Tensor] = None
    behavior_logprobs: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.position_ids is None:
            b, s = self.tokens.shape
            self.position_ids = torch.arange(s, device=self.tokens.device).expand(b, s)
        for field in _PER_POSITION:
            value = getattr(self, field)
            if value is not None and value.shape[:2] != self.tokens.shape:
                raise ValueError(f"MicroBatch.{field} has shape {list(value.shape)}, tokens {list(self.tokens.shape)}")

    @property
    def num_tokens(self) -> torch.Tensor:
        """Valid (loss) positions of this micro-batch, a 0-d int64 tensor."""
        return self.loss_mask.sum()

    def split_for_cp(self, cp_size: int, cp_rank: int) -> "MicroBatch":
        """This CP rank's share: every per-position tensor keeps Megatron's chunks r and 2*CP-1-r."""
        if cp_size == 1:
            return self
        index, _ = cp_positions(self.tokens.shape, cp_size, cp_rank, device=self.tokens.device)
        parts = {f: split_for_cp(getattr(self, f), index, 1) for f in _PER_POSITION if getattr(self, f) is not None}
        return dataclasses.replace(self, **parts)

    def to(self, device) -> "MicroBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)


_PER_POSITION = tuple(f.name for f in dataclasses.fields(MicroBatch) if f.name != "plan")  # [b, s, ...] each
