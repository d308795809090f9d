"""Per-position OPD losses and their gated reduction (method.md, "Position losses").

Both losses reduce as  L = sum_t m_t * stopgrad(g~_t) * l_t / (N + eps)  where N = sum_t m_t by default, or the
global valid-token count of the whole optimizer-step batch (``num_tokens``) when the batch is split into
micro-batches and data-parallel ranks, so that summing the per-micro-batch losses gives the whole batch's loss.

Layer 1 of the package: tensors in, tensors out; no torch.distributed, no Megatron.
"""

from typing import Optional, Tuple

import torch

from .method_config import ADVANTAGE_FROM

EPS = 1e-8


def _check_same_shape(**tensors):
    shapes = {name: list(t.shape) for name, t in tensors.items() if t is not None}
    if len({tuple(s) for s in shapes.values()}) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))


def _check_finite(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
    """ValueError naming the first valid position where ``values`` is NaN/inf (one host sync)."""
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"non-finite {name} at valid position {list(index)} (shape {list(values.shape)})")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Compute in float32, or float64 when the input is float64 (bf16/fp16 inputs are upcast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gated_mean(per_position: torch.Tensor, loss_mask: torch.Tensor, gates: Optional[torch.Tensor] = None,
               num_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(m * stopgrad(g) * l) / (N + eps); masked positions contribute exactly 0 (even if l is NaN there)."""
    mask = loss_mask != 0
    weight = mask.to(per_position.dtype)
    if gates is not None:
        _check_same_shape(per_position=per_position, gates=gates)
        weight = weight * gates.detach().to(per_position.dtype)
    total = torch.where(mask, per_position * weight, 0.0).sum()
    denom = mask.sum() if num_tokens is None else num_tokens
    return total / (denom + EPS)


def sampled_token_opd_loss(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                           loss_mask: torch.Tensor, gates: Optional[torch.Tensor] = None,
                           clip_eps: Tuple[float, float] = (0.2, 0.2), adv_clip: float = 5.0,
                           num_tokens: Optional[torch.Tensor] = None, dual_clip: Optional[float] = None,
                           advantage_from: str = "old"):
    """PPO clipped surrogate with the teacher's log-ratio as advantage; ``(loss, metrics)``.

    A_t = clamp(lp_teach_t - lp_old_t, -adv_clip, adv_clip) (detached, not normalized); with ``advantage_from``
    "current" (AsyncOPD) A_t = clamp(lp_teach_t - stopgrad(lp_cur_t), ...): recomputed from the current student;
    r_t = exp(lp_cur_t - lp_old_t);  l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t).
    ``dual_clip`` c > 1 (dual-clip PPO): where A_t < 0, l_t = min(l_t, -c A_t), which bounds the push-down of a
    token the current policy already rates far above the behavior policy (r_t > c: no gradient); None: off.
    All inputs ``[...]`` of one shape (``[b, s]`` or ``[n]``); only ``cur_logprobs`` carries gradient.
    """
    terms = ppo_terms(cur_logprobs, old_logprobs, teacher_logprobs, loss_mask, clip_eps, adv_clip, advantage_from)
    loss = gated_mean(ppo_losses(terms, dual_clip), loss_mask, gates, num_tokens)
    return loss, ppo_metrics(terms, loss_mask, dual_clip)


@torch.no_grad()
def ppo_metrics(terms, loss_mask: torch.Tensor, dual_clip: Optional[float] = None) -> dict:
    """The metrics of ``sampled_token_opd_loss`` from its ``ppo_terms`` (e.g. gathered from the chunks of a loss
    taken elsewhere): the 0-d pg_clipfrac, ratio_mean, advantage_mean and approx_kl_old_cur over the valid positions
    (with ``dual_clip`` also dual_clipfrac, the fraction held at -c A_t)."""
    log_ratio, ratio, advantage, unclipped, clipped = terms
    mask = loss_mask != 0
    count = mask.sum().clamp(min=1)
    metrics = dict(
        pg_clipfrac=((clipped < unclipped) & mask).sum() / count,
        ratio_mean=torch.where(mask, ratio, 0.0).sum() / count,
        advantage_mean=advantage.sum() / count,
        approx_kl_old_cur=torch.where(mask, -log_ratio, 0.0).sum() / count,
    )
    if dual_clip is not None:
        metrics["dual_clipfrac"] = ((advantage < 0) & (ratio > dual_clip) & mask).sum() / count
    return metrics


def ppo_losses(terms, dual_clip: Optional[float] = None) -> torch.Tensor:
    """The per-position l_t of ``sampled_token_opd_loss`` ``[...]`` (0 where masked), before gating and reduction:
    l_t = -min(r_t A_t, clip(r_t) A_t), with ``dual_clip`` c held at most -c A_t where A_t < 0."""
    _, _, advantage, unclipped, clipped = terms
    losses = -torch.minimum(unclipped, clipped)
    if dual_clip is None:
        return losses
    if not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    return torch.where(advantage < 0, torch.minimum(losses, -dual_clip * advantage), losses)


def ppo_terms(cur_logprobs, old_logprobs, teacher_logprobs, loss_mask, clip_eps=(0.2, 0.2), adv_clip=5.0,
              advantage_from="old"):
    """log r_t, r_t, A_t, r_t A_t and clip(r_t) A_t ``[...]`` (0 where masked), after checking shapes and
    finiteness; A_t from lp_old (``advantage_from`` "old") or the detached lp_cur ("current"). The per-position
    pieces of ``sampled_token_opd_loss``: ``ppo_losses`` and ``ppo_metrics`` take them."""
    if advantage_from not in ADVANTAGE_FROM:
        raise ValueError(f"advantage_from must be one of {ADVANTAGE_FROM}, got {advantage_from!r}")
    mask = loss_mask != 0
    _check_same_shape(cur_logprobs=cur_logprobs, old_logprobs=old_logprobs, teacher_logprobs=teacher_logprobs,
                      loss_mask=mask)
    old = _upcast(old_logprobs.detach())
    teacher = _upcast(teacher_logprobs.detach())
    for name, values in (("cur_logprobs", cur_logprobs), ("old_logprobs", old), ("teacher_logprobs", teacher)):
        _check_finite(name, values, mask)
    eps_low, eps_high = clip_eps
    log_ratio = torch.where(mask, _upcast(cur_logprobs) - old, 0.0)
    ratio = torch.exp(log_ratio)
    student = old if advantage_from == "old" else _upcast(cur_logprobs.detach())
    advantage = torch.where(mask, teacher - student, 0.0).clamp(-adv_clip, adv_clip)
    return log_ratio, ratio, advantage, ratio * advantage, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantage


def topk_lsm_loss(student_logits_at_support: torch.Tensor, teacher_logprobs_at_support: torch.Tensor,
                  loss_mask: torch.Tensor, gates: Optional[torch.Tensor] = None, log_ratio_clip: float = 5.0,
                  support_mask: Optional[torch.Tensor] = None, num_tokens: Optional[torch.Tensor] = None):
    """Teacher-TopK / local support matching: reverse KL renormalized on the teacher's top-K support.

    With S_t the support (``[..., K]``, optionally restricted by ``support_mask``):
    p~_s = softmax over S_t of the student's logits, p~_q = softmax over S_t of the teacher's log-probs,
    l_t = sum_k p~_s(k) * clamp(log p~_s(k) - log p~_q(k), -c, c)  with c = ``log_ratio_clip``.
    The loss is back-propagated directly into the student logits (not used as an advantage).
    ``support_mask`` [..., K] bool drops entries (e.g. a duplicate when the sampled token is appended as a "tail").
    """
    if student_logits_at_support.shape != teacher_logprobs_at_support.shape:
        raise ValueError(f"support shapes differ: student {list(student_logits_at_support.shape)}, teacher "
                         f"{list(teacher_logprobs_at_support.shape)}")
    if student_logits_at_support.shape[:-1] != loss_mask.shape:
        raise ValueError(f"loss_mask has shape {list(loss_mask.shape)}, support is "
                         f"{list(student_logits_at_support.shape)} ([..., K])")
    mask = loss_mask != 0
    if support_mask is None:
        support_mask = torch.ones_like(student_logits_at_support, dtype=torch.bool)
    elif support_mask.shape != student_logits_at_support.shape:
        raise ValueError(f"support_mask has shape {list(support_mask.shape)}, support "
                         f"{list(student_logits_at_support.shape)}")
    entry_mask = support_mask & mask.unsqueeze(-1)
    teacher = _upcast(teacher_logprobs_at_support.detach())
    _check_finite("teacher_logprobs_at_support", teacher, entry_mask)
    _check_finite("student_logits_at_support", student_logits_at_support.detach(), entry_mask)
    student = _upcast(student_logits_at_support)
    neg_inf = torch.finfo(student.dtype).min
    student_logp = torch.log_softmax(torch.where(support_mask, student, neg_inf), -1)
    teacher_logp = torch.log_softmax(torch.where(support_mask, teacher, neg_inf), -1)
    log_ratio = (student_logp - teacher_logp).clamp(-log_ratio_clip, log_ratio_clip)
    per_entry = torch.where(entry_mask, student_logp.exp() * log_ratio, 0.0)
    per_position = per_entry.sum(-1)
    loss = gated_mean(per_position, mask, gates, num_tokens)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        metrics = dict(support_kl=torch.where(mask, per_position, 0.0).sum() / count)
    return loss, metrics


def top_entropy_mask(entropy: torch.Tensor, loss_mask: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """Loss mask restricted to the ``fraction`` of valid positions with the highest entropy (ties kept)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mask = loss_mask != 0
    valid = entropy[mask]
    if valid.numel() == 0:
        return mask
    keep = max(1, int(round(fraction * valid.numel())))
    cutoff = valid.float().topk(keep).values[-1]
    return mask & (entropy >= cutoff)
