"""The gated OPD loss on the LM head: what the last pipeline stage computes for one micro-batch.

head (``vocab_parallel.LMHead``: this TP rank's vocabulary shard of this CP rank's share of the positions, as
logits [b, s, V/tp] or as final hidden states [b, s, h] with the output layer's weight shard [V/tp, h]) ->
  current log-probs of the labels (vocab-parallel, never gathering the vocabulary) ->
  drift gates (segment sums combined over the CP group, normalized over the configured scope) ->
  sampled-token PPO loss, or LSM on the teacher's top-K support (student logits gathered at the support ids),
  reduced with the global valid-token count of the optimizer-step batch.

Where the head takes a token loss's gradient in its forward (hidden states) and that is exact without more
communication (``gradient_in_forward``), the sampled-token and SFT losses do so (``LMHead.token_loss``: chunks cut
at gate-segment starts, each chunk's raw gates, PPO terms and drift weights computed once from its log-probs and
kept for the metrics, the scope's normalization factor applied after); elsewhere the loss back-propagates through
``LMHead.logprobs``. Either way one pass over the vocabulary gives the log-probs and, for the logged
``support_kl``, the student's logits on the teacher's support.

Two options of the LSM reference code: ``tail`` appends the sampled token to the support where the teacher's top-K
misses it, and the top-entropy filter (``MicroBatch.train_mask``, chosen by the trainer over the whole mini-batch)
restricts the loss positions. ``drift_control`` adds one of the RL frameworks' controls of stale or reused samples
(``drift_controls``: token drop, ICE-POP, TIS, sequence masks, M2PO) as per-position weights beside the gates, and
``advantage_from: current`` recomputes the sampled-token advantage from the current student.
"""

import dataclasses
from typing import List, Optional

import torch
import torch.distributed

from ..drift_controls import control_metrics, drift_penalty, drift_weights, m2po_cutoff, squared_log_ratios
from ..gating import ChunkGates, gates_for_segments, normalization_factor, segment_starts
from ..losses import (EPS, gated_mean, ppo_losses, ppo_metrics, ppo_terms, sampled_token_opd_loss, top_entropy_mask,
                      topk_lsm_loss)
from ..method_config import DriftControlConfig
from ..parallel.context_parallel import group_cat, group_sum
from ..vocab_parallel import LMHead
from .batch import MicroBatch
from .config import LossConfig


def opd_loss(head: LMHead, batch: MicroBatch, config: LossConfig, num_tokens: torch.Tensor, *, cp_group=None,
             normalizer=None, m2_cutoff=None):
    """Gated OPD loss of one micro-batch from its LM ``head`` (positions ``[b, s]``): ``(loss, metrics)``.

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
    lsm = config.kind == "topk_lsm"
    support = lsm_support(batch, config.tail) if lsm or batch.teacher_topk_ids is not None else None
    logged = None if lsm or support is None else support[0]  # where the student's logits give support_kl
    if not lsm and gradient_in_forward(head, batch, config, cp_group):
        loss, cur, at_support, gates, gate_stats, weights, metrics = _loss_in_forward(
            head, batch, mask, config, num_tokens, weights, logged, normalizer)
    else:
        cur = head.logprobs(batch.labels, config.temperature, logits_at=logged)  # with the support's logits: a pair
        cur, at_support = cur if logged is not None else (cur, None)
        if control.ratio == "current/behavior":
            weights = drift_weights(control, cur, batch.old_logprobs, batch.behavior_logprobs, batch.loss_mask)
        gates, gate_stats = gates_for_segments(cur, batch.old_logprobs, batch.loss_mask, batch.segment_ids,
                                               batch.plan, config.gate, reduce=group_sum(cp_group),
                                               normalizer=normalizer)
        loss, metrics = _loss_after_forward(head, batch, mask, config, num_tokens, cur, _weighted(gates, weights),
                                            support)
        if control.kind == "token_drop":  # the log-ratio penalty at every trained position
            loss = loss + gated_mean(drift_penalty(cur, batch.behavior_logprobs, mask, control.penalty), mask, gates,
                                     num_tokens)
    if at_support is not None:  # logged: how far the student is from the teacher on its support
        metrics["support_kl"] = topk_lsm_loss(at_support, support[1], mask, log_ratio_clip=config.log_ratio_clip,
                                              support_mask=support[2])[1]["support_kl"]
    if weights is not None:
        metrics.update(control_metrics(control, weights, cur, batch.old_logprobs, batch.behavior_logprobs,
                                       batch.loss_mask))
    metrics.update({k: v for k, v in gate_stats.items() if v.dim() == 0})
    metrics.update(normalizer_terms=gate_stats["normalizer_terms"], gates=gates,
                   drift=torch.where(batch.loss_mask, cur.detach() - batch.old_logprobs, 0.0))
    return loss, metrics


def _loss_after_forward(head: LMHead, batch: MicroBatch, mask, config: LossConfig, num_tokens, cur, gates, support):
    """(loss, metrics) of the kind from lp_cur ``[b, s]`` (with gradient) and the weighted gates ``[b, s]``; LSM
    back-propagates through the head's logits at the support. Both sides of the support at temperature 1: the
    teacher's prefill log-probs are, and LSM matches the renormalized distributions (``temperature`` only rescales
    the sampled-token log-probs)."""
    if config.kind == "sft":
        return gated_mean(-cur, mask, None, num_tokens), {}
    if config.kind == "sampled_token":
        return sampled_token_opd_loss(cur, batch.old_logprobs, batch.teacher_logprobs, mask, gates, config.clip_eps,
                                      config.adv_clip, num_tokens=num_tokens, dual_clip=config.dual_clip,
                                      advantage_from=config.advantage_from)
    ids, teacher, support_mask = support
    return head.lsm_loss(ids, teacher, mask, gates=gates, num_tokens=num_tokens, log_ratio_clip=config.log_ratio_clip,
                         support_mask=support_mask)


def _loss_in_forward(head: LMHead, batch: MicroBatch, mask, config: LossConfig, num_tokens, weights, logged,
                     normalizer):
    """The sampled-token or SFT loss with its gradient taken in the head's forward: sum_t m_t g_t (w_t l_t + pen_t)
    by ``head.token_loss`` on chunks that start at gate-segment starts, with the raw gates g_t of each chunk's
    segments (``gating.ChunkGates``), the drift control's weights ``weights`` ``[b, s]`` known before the forward
    (None: 1) or token_drop's from each chunk's lp_cur with its penalty pen_t, times the scope's one normalization
    factor over N + eps. Each chunk's gates, PPO terms and token_drop weights are kept, so that the metrics need no
    second pass. Returns (loss, lp_cur ``[b, s]``, the logits at ``logged`` or None, gates, gate stats, weights,
    metrics)."""
    flat = {k: v.reshape(-1) for k, v in dict(mask=mask, valid=batch.loss_mask, old=batch.old_logprobs,
                                               teacher=batch.teacher_logprobs, weight=weights,
                                               behavior=batch.behavior_logprobs).items()
            if v is not None}
    control, sampled = config.drift_control, config.kind == "sampled_token"
    chunk_gates = ChunkGates(config.gate, batch.segment_ids) if sampled and config.gate.granularity != "none" \
        else None
    kept = dict(terms=[], weights=[])

    def token_loss(part: slice, lp: torch.Tensor) -> torch.Tensor:
        m = flat["mask"][part]
        if not sampled:
            return torch.where(m, -lp, 0.0).sum()
        terms = ppo_terms(lp, flat["old"][part], flat["teacher"][part], m, config.clip_eps, config.adv_clip,
                          config.advantage_from)
        kept["terms"].append([t.detach() for t in terms])
        losses = ppo_losses(terms, config.dual_clip)
        if "weight" in flat:
            losses = losses * flat["weight"][part].to(losses.dtype)
        if control.kind == "token_drop":
            behavior = flat["behavior"][part]
            kept["weights"].append(drift_weights(control, lp, None, behavior, flat["valid"][part]))
            losses = losses * kept["weights"][-1].to(losses.dtype) + drift_penalty(lp, behavior, m, control.penalty)
        if chunk_gates is not None:
            losses = losses * chunk_gates.chunk(part, lp, flat["old"][part], flat["valid"][part])
        return torch.where(m, losses, 0.0).sum()

    starts = None if chunk_gates is None else segment_starts(batch.segment_ids)
    raw_sum, cur, at_support = head.token_loss(batch.labels, token_loss, config.temperature, starts, logged)
    if chunk_gates is not None:
        gates, gate_stats = chunk_gates.finish(cur, batch.old_logprobs, batch.loss_mask, normalizer)
    else:  # the loss read no gate: taken once here, for the metrics
        gates, gate_stats = gates_for_segments(cur, batch.old_logprobs, batch.loss_mask, batch.segment_ids,
                                               batch.plan, config.gate, normalizer=normalizer)
    factor = 1.0 if not sampled else normalization_factor(config.gate, gate_stats["normalizer_terms"], normalizer)
    metrics = {} if not sampled else ppo_metrics([torch.cat(t) for t in zip(*kept["terms"])], flat["mask"],
                                                 config.dual_clip)
    if kept["weights"]:
        weights = torch.cat(kept["weights"]).view(cur.shape)
    return raw_sum * (factor / (num_tokens + EPS)), cur, at_support, gates, gate_stats, weights, metrics


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


def gradient_in_forward(head: LMHead, batch: MicroBatch, config: LossConfig, cp_group=None) -> bool:
    """Whether the sampled-token / SFT loss takes its gradient in the head's forward (``LMHead.token_loss``, 3 GEMMs
    instead of 4): a head that can (hidden states), no context parallelism (a gate segment then lies whole on this
    rank), gates normalized by one factor (not per sequence), and gate segments short enough to end a chunk (at
    most 4 chunks; the "sequence" granularity on long responses is not)."""
    gate = config.gate
    if not head.gradient_in_forward or (cp_group is not None and torch.distributed.get_world_size(cp_group) > 1):
        return False
    if config.kind == "sft" or gate.granularity == "none":
        return True
    if gate.normalize and gate.scope == "sequence":
        return False
    return batch.plan.longest_segment <= 4 * head.chunk


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
