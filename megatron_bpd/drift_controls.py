"""Drift controls: the RL frameworks' answers to stale or reused samples, as per-position loss weights.

Three policies score each sampled token y_t: the current student pi_theta (lp_cur, with gradient), the proximal
pi_old (lp_old: the weights before the step, ``reuse.old_logprobs: recompute``) and the behavior policy that sampled
it (lp_beh, the rollout's log-probs). Each control gives a detached weight w_t per position that multiplies the
position's loss next to the gate, L = sum_t m_t g_t (w_t l_t + pen_t) / N (docs/method.md, "Drift controls"):

    token_drop  (prime-rl)  w_t = 1[-below <= p_cur - p_beh <= above]  (probabilities; ``above`` None: one-sided)
                            pen_t = penalty * (lp_cur - lp_beh)^2 at every valid position (with gradient)
    icepop      (NeMo-RL)   w_t = rho_t 1[lo <= rho_t <= hi],   rho_t = exp(lp_old - lp_beh)
    tis         (verl, slime, OpenRLHF; AReaL's decoupled PPO)   w_t = min(rho_t, cap)
    seq_mask    (NeMo-RL seq-mask-tis)   w_t = rho_t 1[lo <= exp(mean_{t' in seq} log rho_t') <= hi]
    m2po        (M2PO)      w_t = 1[(log rho_t)^2 < c]: c removes the largest (log rho)^2 of the optimizer-step batch
                            until the second moment of the kept ones is <= threshold (``m2po_cutoff``)

Shapes: every per-position tensor is ``[b, s]`` (rows are sequences; ``seq_mask`` averages over a row) or ``[n]``
for the per-position controls. seq_mask's per-sequence sums and m2po's batch moment span more than one process under
context or data parallelism: ``reduce`` (sum over the CP group) and ``m2po_cutoff`` over values gathered from every
rank make them the same as on one process.

Layer 1 of the package: tensors in, tensors out; no torch.distributed, no Megatron.
"""

from typing import Callable, Optional, Tuple

import torch

from .losses import _check_finite, _check_same_shape
from .method_config import DriftControlConfig

METRICS = ("drift_masked_frac", "drift_weight_mean", "drift_weight_max", "drift_penalty", "drift_m2",
           "drift_m2_kept")


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0.0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float64 for the ratios: the controls compare them against bounds and sum them across ranks."""
    return x.detach().to(torch.float64)


def log_ratio(numerator: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho_t = lp_numerator - lp_beh over valid positions, 0 elsewhere; float64, detached."""
    return _masked(_wide(numerator) - _wide(behavior), mask)


def token_drop_weights(cur: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, below: float,
                       above: Optional[float] = None) -> torch.Tensor:
    """w_t = 1[-below <= exp(lp_cur) - exp(lp_beh) <= above] (0 where masked); ``above`` None: no upper bound."""
    diff = torch.exp(_wide(cur)) - torch.exp(_wide(behavior))
    keep = mask & (diff >= -below)
    if above is not None:
        keep &= diff <= above
    return keep.to(torch.float64)


def drift_penalty(cur: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, coefficient: float) -> torch.Tensor:
    """pen_t = coefficient * (lp_cur - lp_beh)^2 (0 where masked), differentiable in ``cur``; in ``cur``'s dtype."""
    diff = _masked(cur - behavior.detach().to(cur.dtype), mask)  # before squaring: no NaN gradient where masked
    return coefficient * diff * diff


def icepop_weights(old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor,
                   bounds: Tuple[float, float]) -> torch.Tensor:
    """w_t = rho_t 1[lo <= rho_t <= hi], rho_t = exp(lp_old - lp_beh) (0 where masked)."""
    ratio = torch.exp(log_ratio(old, behavior, mask))
    return _masked(ratio, mask & (ratio >= bounds[0]) & (ratio <= bounds[1]))


def tis_weights(old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(rho_t, cap), rho_t = exp(lp_old - lp_beh) (0 where masked)."""
    return _masked(torch.exp(log_ratio(old, behavior, mask)).clamp(max=cap), mask)


def seq_mask_weights(old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, bounds: Tuple[float, float],
                     reduce: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """w_t = rho_t 1[lo <= exp(mean_t log rho_t) <= hi] per row of ``[b, s]`` (a sequence with no valid position is
    kept). ``reduce``: an in-place sum of the per-row ``[b, 2]`` (sum of log rho, count) over the ranks that hold the
    rest of each row (context parallelism), so that the mean is the whole sequence's."""
    if mask.dim() != 2:
        raise ValueError(f"seq_mask needs [b, s] inputs (rows are sequences), got shape {list(mask.shape)}")
    log_rho = log_ratio(old, behavior, mask)
    sums = torch.stack([log_rho.sum(-1), mask.sum(-1).to(torch.float64)], -1)
    if reduce is not None:
        reduce(sums)
    mean = sums[:, 0] / sums[:, 1].clamp(min=1)
    geometric_mean = torch.exp(mean)
    kept = ((geometric_mean >= bounds[0]) & (geometric_mean <= bounds[1])) | (sums[:, 1] == 0)
    return _masked(torch.exp(log_rho), mask & kept[:, None])


def m2po_cutoff(squared: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2PO's cutoff over the optimizer-step batch: ``squared`` ``[n]`` = (log rho_t)^2 of every valid position.
    Removing the largest values one by one until the mean of the rest is <= ``threshold`` keeps the k smallest,
    k the largest count whose ascending prefix mean is <= threshold (prefix means only grow); the cutoff is the
    smallest removed value (+inf when nothing is removed), and ``m2po_weights`` keeps the values strictly below
    it, so equal values at the cutoff go together and the kept moment never exceeds the threshold. 0-d float64."""
    values = squared.detach().to(torch.float64).reshape(-1).sort().values
    prefix_mean = values.cumsum(0) / torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device)
    kept = int((prefix_mean <= threshold).sum())
    return values[kept] if kept < values.numel() else values.new_tensor(float("inf"))


def m2po_weights(old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """w_t = 1[(lp_old - lp_beh)^2 < cutoff] (0 where masked); ``cutoff`` from ``m2po_cutoff``."""
    squared = log_ratio(old, behavior, mask) ** 2
    return (mask & (squared < cutoff.to(squared.device))).to(torch.float64)


def squared_log_ratios(old: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[n_valid]`` (lp_old - lp_beh)^2 of the valid positions: M2PO's values for ``m2po_cutoff``."""
    return (log_ratio(old, behavior, mask) ** 2)[mask]


def drift_weights(config: DriftControlConfig, cur: torch.Tensor, old: torch.Tensor, behavior: torch.Tensor,
                  mask: torch.Tensor, *, reduce=None, m2_cutoff: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w_t ``[...]`` float64 (detached, 0 where masked) of ``config.kind`` (not "none"); ``cur`` is read only by
    token_drop, ``reduce`` only by seq_mask, ``m2_cutoff`` (``m2po_cutoff`` of the whole batch) only by m2po. A
    NaN/inf log-prob that the control reads at a valid position is a ValueError naming the position."""
    mask = mask != 0
    read = dict(behavior_logprobs=behavior, **({"cur_logprobs": cur} if config.ratio == "current/behavior"
                                                else {"old_logprobs": old}))
    _check_same_shape(loss_mask=mask, **read)
    for name, values in read.items():
        _check_finite(name, values.detach(), mask)
    if config.kind == "token_drop":
        return token_drop_weights(cur, behavior, mask, config.drop_below, config.drop_above)
    if config.kind == "icepop":
        return icepop_weights(old, behavior, mask, config.ratio_bounds)
    if config.kind == "tis":
        return tis_weights(old, behavior, mask, config.cap)
    if config.kind == "seq_mask":
        return seq_mask_weights(old, behavior, mask, config.seq_bounds, reduce)
    if config.kind == "m2po":
        if m2_cutoff is None:
            raise ValueError("drift control 'm2po' needs m2_cutoff=: m2po_cutoff of the whole optimizer-step batch")
        return m2po_weights(old, behavior, mask, m2_cutoff)
    raise ValueError(f"no weights for drift control kind {config.kind!r}")


@torch.no_grad()
def control_metrics(config: DriftControlConfig, weights: torch.Tensor, cur: torch.Tensor, old: torch.Tensor,
                    behavior: torch.Tensor, mask: torch.Tensor) -> dict:
    """0-d float32 summaries over the valid positions: ``drift_masked_frac`` (w_t = 0), ``drift_weight_mean``,
    ``drift_weight_max``; token_drop adds ``drift_penalty`` (mean pen_t), m2po ``drift_m2`` (the second moment of
    log rho before masking) and ``drift_m2_kept`` (after)."""
    mask = mask != 0
    count = mask.sum().clamp(min=1)
    metrics = dict(drift_masked_frac=(mask & (weights == 0)).sum() / count,
                   drift_weight_mean=_masked(weights, mask).sum() / count,
                   drift_weight_max=_masked(weights, mask).max() if mask.any() else weights.new_zeros(()))
    if config.kind == "token_drop":
        metrics["drift_penalty"] = drift_penalty(cur.detach().double(), behavior, mask, config.penalty).sum() / count
    if config.kind == "m2po":
        squared = log_ratio(old, behavior, mask) ** 2
        kept = mask & (weights != 0)
        metrics.update(drift_m2=squared.sum() / count, drift_m2_kept=_masked(squared, kept).sum() / kept.sum().clamp(
            min=1))
    return {k: v.float() for k, v in metrics.items()}
