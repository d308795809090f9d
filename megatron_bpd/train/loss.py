"""The gated OPD loss on vocab-parallel logits: what the last pipeline stage computes for one micro-batch.

logits [b, s, V/tp] (this TP rank's vocabulary shard, this CP rank's share of the positions), or with the fused
head the final hidden states [b, s, h] and the output layer's weight shard [V/tp, h] (``HiddenStates``) ->
  current log-probs of the labels (vocab-parallel, never gathering the vocabulary) ->
  drift gates (segment sums combined over the CP group, normalized over the configured scope) ->
  sampled-token PPO loss, or LSM on the teacher's top-K support (student logits gathered at the support ids),
  reduced with the global valid-token count of the optimizer-step batch.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

from ..gating import GateConfig, gates_for_segments
from ..losses import gated_mean, sampled_token_opd_loss
from ..parallel.context_parallel import group_sum
from ..vocab_parallel import fused_linear_logprobs, fused_linear_lsm_loss, logprobs_at, topk_lsm_loss_parallel
from .batch import MicroBatch

LOSSES = ("sampled_token", "topk_lsm", "sft")


@dataclass
class LossConfig:
    """The OPD loss: ``kind`` "sampled_token" (PPO with teacher advantage) or "topk_lsm" (Teacher-TopK/LSM); or
    "sft", the off-policy control: l_t = -lp_cur_t, the negative log-likelihood of the sampled tokens (with
    ``rollout.policy: teacher``, supervised fine-tuning on teacher samples; gates do not apply)."""

    kind: str = "sampled_token"
    gate: GateConfig = field(default_factory=GateConfig)
    clip_eps: Tuple[float, float] = (0.2, 0.2)
    adv_clip: float = 5.0
    log_ratio_clip: float = 5.0
    temperature: float = 1.0
    vocab_size: Optional[int] = None  # the real vocabulary when the model's is padded for TP
    # the output layer fused with the loss: the logits [b, s, V/tp] and their gradient are never held
    fused_head: bool = True

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"LossConfig.kind must be one of {LOSSES}, got {self.kind!r}")
        self.clip_eps = tuple(self.clip_eps)
        if self.kind == "sft" and self.gate.granularity != "none":
            raise ValueError(f"the sft loss takes no gate (gate.granularity must be 'none', got "
                             f"{self.gate.granularity!r})")


@dataclass
class HiddenStates:
    """The fused head's input in place of logits: final hidden states ``[b, s, h]`` and this rank's output-layer
    weight shard ``[V/tp, h]`` (the logits are hidden @ weight^T)."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _logprobs(head: Union[torch.Tensor, HiddenStates], labels, tp_group, config: LossConfig) -> torch.Tensor:
    kw = dict(temperature=config.temperature, vocab_size=config.vocab_size)
    if isinstance(head, HiddenStates):
        return fused_linear_logprobs(head.hidden, head.weight, labels, tp_group, **kw)
    return logprobs_at(head, labels, tp_group, **kw)


def _lsm_loss(head: Union[torch.Tensor, HiddenStates], batch: MicroBatch, tp_group, config: LossConfig, **kw):
    args = (batch.teacher_topk_ids, batch.teacher_topk_logprobs, batch.loss_mask, tp_group)
    kw.update(vocab_size=config.vocab_size, log_ratio_clip=config.log_ratio_clip)
    if isinstance(head, HiddenStates):
        return fused_linear_lsm_loss(head.hidden, head.weight, *args, **kw)
    return topk_lsm_loss_parallel(head, *args, **kw)


def opd_loss(logits: Union[torch.Tensor, HiddenStates], batch: MicroBatch, config: LossConfig,
             num_tokens: torch.Tensor, *, tp_group=None, cp_group=None, normalizer=None):
    """Gated OPD loss of one micro-batch: ``(loss, metrics)``; ``logits`` vocab-parallel ``[b, s, V/tp]``, or
    ``HiddenStates`` for the fused output layer (the same loss, the logits never held).

    ``loss`` = sum over this rank's valid positions of m * g * l, divided by ``num_tokens`` (the valid-token count
    of the whole optimizer-step batch: all micro-batches, DP and CP ranks), so that the losses of all micro-batches
    and ranks add up to the loss of the whole batch. ``normalizer``: the summed gate normalizer terms for the
    gate scope "global". ``metrics`` holds the loss's and the gate's 0-d summaries, the gate's
    ``normalizer_terms`` and the per-position ``gates`` of this rank's positions.
    """
    cur = _logprobs(logits, batch.labels, tp_group, config)
    gates, gate_stats = gates_for_segments(cur, batch.old_logprobs, batch.loss_mask, batch.segment_ids, batch.plan,
                                           config.gate, reduce=group_sum(cp_group), normalizer=normalizer)
    if config.kind in ("sampled_token", "sft"):
        if config.kind == "sft":
            loss, metrics = gated_mean(-cur, batch.loss_mask, None, num_tokens), {}
        elif batch.teacher_logprobs is None:
            raise ValueError("the sampled_token loss needs MicroBatch.teacher_logprobs")
        else:
            loss, metrics = sampled_token_opd_loss(cur, batch.old_logprobs, batch.teacher_logprobs, batch.loss_mask,
                                                   gates, config.clip_eps, config.adv_clip, num_tokens=num_tokens)
        if batch.teacher_topk_ids is not None:  # logged: how far the student is from the teacher on its support
            with torch.no_grad():
                metrics["support_kl"] = _lsm_loss(logits, batch, tp_group, config)[1]["support_kl"]
    else:
        if batch.teacher_topk_ids is None or batch.teacher_topk_logprobs is None:
            raise ValueError("the topk_lsm loss needs MicroBatch.teacher_topk_ids and teacher_topk_logprobs")
        # Both sides of the support at temperature 1: the teacher's prefill log-probs are, and LSM matches the
        # renormalized distributions (``temperature`` only rescales the sampled-token log-probs).
        loss, metrics = _lsm_loss(logits, batch, tp_group, config, gates=gates, num_tokens=num_tokens)
    metrics.update({k: v for k, v in gate_stats.items() if v.dim() == 0})
    metrics.update(normalizer_terms=gate_stats["normalizer_terms"], gates=gates)
    return loss, metrics
