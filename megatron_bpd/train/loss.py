"""The gated OPD loss on vocab-parallel logits: what the last pipeline stage computes for one micro-batch.

logits [b, s, V/tp] (this TP rank's vocabulary shard, this CP rank's share of the positions), or with the fused
head the final hidden states [b, s, h] and the output layer's weight shard [V/tp, h] (``HiddenStates``) ->
  current log-probs of the labels (vocab-parallel, never gathering the vocabulary) ->
  drift gates (segment sums combined over the CP group, normalized over the configured scope) ->
  sampled-token PPO loss, or LSM on the teacher's top-K support (student logits gathered at the support ids),
  reduced with the global valid-token count of the optimizer-step batch.

With the fused head, the sampled-token and SFT losses take their gradient in the head's forward
(``fused_linear_token_loss``: chunks cut at gate-segment starts, raw gates per chunk, the scope's normalization
factor applied after) wherever that is exact without more communication (``gradient_in_forward``); elsewhere the
head recomputes the logits in its backward.

Two options of the LSM reference code: ``tail`` appends the sampled token to the support where the teacher's top-K
misses it, and the top-entropy filter (``MicroBatch.train_mask``, chosen by the trainer over the whole mini-batch)
restricts the loss positions. ``drift_control`` adds one of the RL frameworks' controls of stale or reused samples
(``drift_controls``: token drop, ICE-POP, TIS, sequence masks, M2PO) as per-position weights beside the gates, and
``advantage_from: current`` recomputes the sampled-token advantage from the current student.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.distributed

from ..drift_controls import control_metrics, drift_penalty, drift_weights, m2po_cutoff, squared_log_ratios
from ..gating import gates_for_segments, normalization_factor, raw_chunk_gates, segment_starts
from ..losses import (EPS, gated_mean, sampled_token_metrics, sampled_token_opd_loss, sampled_token_position_losses,
                      top_entropy_mask)
from ..method_config import DriftControlConfig
from ..parallel.context_parallel import group_cat, group_sum
from ..vocab_parallel import (fused_linear_logprobs, fused_linear_lsm_loss, fused_linear_token_loss, logprobs_at,
                              topk_lsm_loss_parallel)
from ..vocab_parallel.core import chunk_tokens as tokens_per_chunk
from .batch import MicroBatch
from .config import LossConfig

@dataclass
class HiddenStates:
    """The fused head's input in place of logits: final hidden states ``[b, s, h]`` and this rank's output-layer
    weight shard ``[V/tp, h]`` (the logits are hidden @ weight^T)."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _logprobs(head: Union[torch.Tensor, HiddenStates], labels, tp_group, config: LossConfig) -> torch.Tensor:
    kw = dict(temperature=config.temperature, vocab_size=config.vocab_size)
    if isinstance(head, HiddenStates):
        return fused_linear_logprobs(head.hidden, head.weight, labels, tp_group, chunk_tokens=config.chunk_tokens,
                                     **kw)
    return logprobs_at(head, labels, tp_group, **kw)


def _lsm_loss(head: Union[torch.Tensor, HiddenStates], batch: MicroBatch, mask, tp_group, config: LossConfig, **kw):
    """LSM on the support of ``lsm_support`` (with the tail when configured), from logits or hidden states."""
    ids, teacher, support_mask = lsm_support(batch, config.tail)
    args = (ids, teacher, mask, tp_group)
    kw.update(vocab_size=config.vocab_size, log_ratio_clip=config.log_ratio_clip, support_mask=support_mask)
    if isinstance(head, HiddenStates):
        return fused_linear_lsm_loss(head.hidden, head.weight, *args, **kw)
    return topk_lsm_loss_parallel(head, *args, **kw)


def opd_loss(logits: Union[torch.Tensor, HiddenStates], batch: MicroBatch, config: LossConfig,
             num_tokens: torch.Tensor, *, tp_group=None, cp_group=None, normalizer=None, m2_cutoff=None):
    """Gated OPD loss of one micro-batch: ``(loss, metrics)``; ``logits`` vocab-parallel ``[b, s, V/tp]``, or
    ``HiddenStates`` for the fused output layer (the same loss, the logits never held).

    ``loss`` = sum over this rank's valid positions of m * g * (w * l + pen) (w, pen: the drift control's weight and
    penalty; 1 and 0 without one), divided by ``num_tokens`` (the valid-token count
    of the whole optimizer-step batch: all micro-batches, DP and CP ranks), so that the losses of all micro-batches
    and ranks add up to the loss of the whole batch. ``normalizer``: the summed gate normalizer terms for the
    gate scope "global". ``m2_cutoff``: the drift control m2po's cutoff over the whole optimizer-step batch
    (``m2po_batch_cutoff``). ``metrics`` holds the loss's and the gate's 0-d summaries, the gate's
    ``normalizer_terms`` and the per-position ``gates`` and ``drift`` (lp_cur - lp_old, 0 where masked) ``[b, s]`` of
    this rank's positions.
    """
    mask = batch.loss_mask if batch.train_mask is None else batch.train_mask
    if config.kind == "sampled_token" and batch.teacher_logprobs is None:
        raise ValueError("the sampled_token loss needs MicroBatch.teacher_logprobs")
    control, weights = config.drift_control, None
    if control.kind != "none" and batch.behavior_logprobs is None:
        raise ValueError(f"loss.drift_control {control.kind!r} needs the rollout's log-probs "
                         "(MicroBatch.behavior_logprobs)")
    if control.ratio == "proximal/behavior":  # known before the forward
        weights = drift_weights(control, None, batch.old_logprobs, batch.behavior_logprobs, batch.loss_mask,
                                reduce=group_sum(cp_group), m2_cutoff=m2_cutoff)
    in_forward = config.kind != "topk_lsm" and gradient_in_forward(logits, batch, config, cp_group)
    if in_forward:  # sum_t m_t g_t (w_t l_t + pen_t) with raw gates, its gradient taken in the forward
        raw_sum, cur = _token_loss_in_forward(logits, batch, mask, tp_group, config, weights)
    else:
        cur = _logprobs(logits, batch.labels, tp_group, config)
    if control.ratio == "current/behavior":
        weights = drift_weights(control, cur, batch.old_logprobs, batch.behavior_logprobs, batch.loss_mask)
    gates, gate_stats = gates_for_segments(cur, batch.old_logprobs, batch.loss_mask, batch.segment_ids, batch.plan,
                                           config.gate, reduce=group_sum(cp_group), normalizer=normalizer)
    if config.kind in ("sampled_token", "sft"):
        ppo = (batch.old_logprobs, batch.teacher_logprobs, mask)
        if in_forward:  # the same loss: the raw gates times the scope's one factor, over N + eps
            factor = 1.0 if config.kind == "sft" else normalization_factor(
                config.gate, gate_stats["normalizer_terms"], normalizer)
            loss = raw_sum * (factor / (num_tokens + EPS))
            metrics = {} if config.kind == "sft" else sampled_token_metrics(cur, *ppo, config.clip_eps,
                                                                            config.adv_clip, config.dual_clip,
                                                                            config.advantage_from)
        elif config.kind == "sft":
            loss, metrics = gated_mean(-cur, mask, None, num_tokens), {}
        else:
            loss, metrics = sampled_token_opd_loss(cur, *ppo, _weighted(gates, weights), config.clip_eps,
                                                   config.adv_clip, num_tokens=num_tokens,
                                                   dual_clip=config.dual_clip, advantage_from=config.advantage_from)
        if batch.teacher_topk_ids is not None:  # logged: how far the student is from the teacher on its support
            with torch.no_grad():
                metrics["support_kl"] = _lsm_loss(logits, batch, mask, tp_group, config)[1]["support_kl"]
    else:
        # Both sides of the support at temperature 1: the teacher's prefill log-probs are, and LSM matches the
        # renormalized distributions (``temperature`` only rescales the sampled-token log-probs).
        loss, metrics = _lsm_loss(logits, batch, mask, tp_group, config, gates=_weighted(gates, weights),
                                  num_tokens=num_tokens)
    if control.kind == "token_drop" and not in_forward:  # the log-ratio penalty at every trained position
        loss = loss + gated_mean(drift_penalty(cur, batch.behavior_logprobs, mask, control.penalty), mask, gates,
                                 num_tokens)
    if weights is not None:
        metrics.update(control_metrics(control, weights, cur, batch.old_logprobs, batch.behavior_logprobs,
                                       batch.loss_mask))
    metrics.update({k: v for k, v in gate_stats.items() if v.dim() == 0})
    metrics.update(normalizer_terms=gate_stats["normalizer_terms"], gates=gates,
                   drift=torch.where(batch.loss_mask, cur.detach() - batch.old_logprobs, 0.0))
    return loss, metrics


def _weighted(gates: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return gates if weights is None else gates * weights


def m2po_batch_cutoff(batches: List[MicroBatch], control: DriftControlConfig, group=None) -> torch.Tensor:
    """The drift control m2po's cutoff (``drift_controls.m2po_cutoff``) over the valid positions of ``batches`` on
    every rank of ``group`` (DP x CP): one value of the whole optimizer-step batch, the same under every layout."""
    if any(b.behavior_logprobs is None for b in batches):
        raise ValueError("loss.drift_control 'm2po' needs the rollout's log-probs (MicroBatch.behavior_logprobs)")
    local = [squared_log_ratios(b.old_logprobs, b.behavior_logprobs, b.loss_mask) for b in batches]
    values = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64)
    return m2po_cutoff(group_cat(values, group), control.m2_threshold)


def gradient_in_forward(head: Union[torch.Tensor, HiddenStates], batch: MicroBatch, config: LossConfig,
                        cp_group=None) -> bool:
    """Whether the fused head can take the sampled-token / SFT loss's gradient in its forward
    (``fused_linear_token_loss``, 3 GEMMs instead of 4): hidden states without context parallelism (a gate
    segment then lies whole on this rank), gates normalized by one factor (not per sequence), and gate segments
    short enough to end a chunk (at most 4 chunks; the "sequence" granularity on long responses is not)."""
    gate = config.gate
    if not isinstance(head, HiddenStates) or (cp_group is not None and torch.distributed.get_world_size(cp_group) > 1):
        return False
    if config.kind == "sft" or gate.granularity == "none":
        return True
    if gate.normalize and gate.scope == "sequence":
        return False
    return batch.plan.longest_segment <= 4 * tokens_per_chunk(config.chunk_tokens, head.weight.shape[0])


def _token_loss_in_forward(head: HiddenStates, batch: MicroBatch, mask, tp_group, config: LossConfig,
                           weights: Optional[torch.Tensor] = None):
    """(sum_t m_t g_t (w_t l_t + pen_t) with the raw gates g_t of each chunk's segments, the drift control's
    weights ``weights`` ``[b, s]`` known before the forward (None: 1) or token_drop's from each chunk's lp_cur with
    its penalty pen_t; lp_cur ``[b, s]``) by ``fused_linear_token_loss`` on chunks that start at segment starts."""
    flat = {k: v.reshape(-1) for k, v in dict(mask=mask, valid=batch.loss_mask, old=batch.old_logprobs,
                                               teacher=batch.teacher_logprobs, seg=batch.segment_ids,
                                               weight=weights, behavior=batch.behavior_logprobs).items()
            if v is not None}
    control = config.drift_control
    seg = flat["seg"]
    gated = config.kind == "sampled_token" and config.gate.granularity != "none"
    starts = segment_starts(batch.segment_ids) if gated else None

    def token_loss(part: slice, lp: torch.Tensor) -> torch.Tensor:
        m = flat["mask"][part]
        if config.kind == "sft":
            return torch.where(m, -lp, 0.0).sum()
        losses = sampled_token_position_losses(lp, flat["old"][part], flat["teacher"][part], m, config.clip_eps,
                                               config.adv_clip, config.dual_clip, config.advantage_from)
        if "weight" in flat:
            losses = losses * flat["weight"][part].to(losses.dtype)
        if control.kind == "token_drop":
            behavior = flat["behavior"][part]
            losses = (losses * drift_weights(control, lp, None, behavior, m).to(losses.dtype)
                      + drift_penalty(lp, behavior, m, control.penalty))
        if gated:
            losses = losses * raw_chunk_gates(lp, flat["old"][part], flat["valid"][part], seg[part], config.gate)
        return torch.where(m, losses, 0.0).sum()

    return fused_linear_token_loss(head.hidden, head.weight, batch.labels, token_loss, tp_group, config.temperature,
                                   config.vocab_size, config.chunk_tokens, starts)


def lsm_support(batch: MicroBatch, tail: bool):
    """The LSM support: (ids, teacher log-probs, support_mask) ``[b, s, K]`` with ``support_mask`` None, or with
    ``tail`` ``[b, s, K + 1]``: the sampled token y_t (the label) and lp_teach_t appended, masked out where y_t is
    already among the top-K (so that no id counts twice)."""
    if batch.teacher_topk_ids is None or batch.teacher_topk_logprobs is None:
        raise ValueError("the LSM support needs MicroBatch.teacher_topk_ids and teacher_topk_logprobs")
    ids, teacher = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    if not tail:
        return ids, teacher, None
    if batch.teacher_logprobs is None:
        raise ValueError("loss.tail needs the teacher's log-probs of the sampled tokens (MicroBatch.teacher_logprobs)")
    labels = batch.labels.unsqueeze(-1)
    outside = ~(ids == labels).any(-1, keepdim=True)
    support_mask = torch.cat([torch.ones_like(ids, dtype=torch.bool), outside], -1)
    sampled = batch.teacher_logprobs.unsqueeze(-1).to(teacher.dtype)
    return torch.cat([ids, labels], -1), torch.cat([teacher, sampled], -1), support_mask


def top_entropy_filter(batches: List[MicroBatch], entropies: List[torch.Tensor], fraction: float, group=None):
    """The top-entropy position filter over a whole mini-batch: ``losses.top_entropy_mask`` of the entropies
    ``[b, s]`` of every valid position of ``batches`` on every rank of ``group`` (DP x CP), so that the kept set is
    the same under every layout. Returns (batches with ``train_mask`` set, kept count: the loss's ``num_tokens``)."""
    local = torch.cat([h[b.loss_mask].detach().float() for h, b in zip(entropies, batches)]) if batches \
        else torch.zeros(0)
    every = group_cat(local, group)
    kept = top_entropy_mask(every, torch.ones_like(every, dtype=torch.bool), fraction)
    cutoff = every[kept].min() if kept.any() else torch.tensor(float("inf"))
    filtered = [dataclasses.replace(b, train_mask=b.loss_mask & (h.detach().float() >= cutoff.to(h.device)))
                for h, b in zip(entropies, batches)]
    return filtered, kept.sum()
