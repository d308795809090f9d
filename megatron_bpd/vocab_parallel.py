"""Ops on logits sharded over the vocabulary on the tensor-parallel group, never gathering the full vocabulary.

Input: Megatron's output-layer logits with ``parallel_output=True``, ``[b, s, V/tp]`` or packed ``[n, V/tp]``, any
float dtype; rank r holds global ids [r*V/tp, (r+1)*V/tp). The model's vocabulary may be padded (to a multiple of
TP*128): ids >= ``vocab_size`` are padding, sliced off before any softmax or top-K. All math is float32 on
x = logits / T (T > 0). Logits must be finite.

Ops: ``logprobs_at`` (log-softmax at ids), ``entropy``, ``topk`` (exact global top-K, no grad), ``gather_at`` (raw
logits at ids) and ``topk_lsm_loss_parallel`` (``gather_at`` + ``losses.topk_lsm_loss``).

One autograd core (``_VocabStats``) serves the differentiable ops. It returns, per position, logsumexp(x) as M + L
(M = max x, a constant; L kept separately so that nothing of magnitude |x| is rounded), the entropy
H = -sum p log p and x at the ids. Memory: it works in chunks of ``chunk_size`` tokens (default: as many as fill
128 MiB of float32) and keeps at most one float32 ``[chunk, V/tp]`` work buffer (two for the entropy); backward
recomputes the softmax chunk by chunk from the saved logits and the [n] statistics (no full-vocabulary softmax is
ever stored; for float32 logits it computes straight into the gradient buffer). Not twice differentiable. Communication: forward is one all-gather over TP of the local statistics
``[n, 2 (+1 entropy) + K]`` float32 per rank (max, log sum exp, x at the K ids: TP*(2+K)*4 bytes received per
position for ``logprobs_at``); backward needs none.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 25  # default chunk: 128 MiB of float32 work, e.g. 220 tokens at V/tp = 151936


@dataclass(frozen=True)
class _Shard:
    """This rank's slice of the (padded) vocabulary: columns [0, valid) of the local logits are real ids
    [start, start + valid); columns [valid, local_size) are padding."""

    group: Optional[dist.ProcessGroup]
    world: int
    start: int
    local_size: int
    valid: int
    vocab_size: int


def _shard(logits: torch.Tensor, tp_group, vocab_size: Optional[int]) -> _Shard:
    """Locate this rank's shard; ``tp_group=None`` means a single unsharded process."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    local_size = logits.shape[-1]
    padded = local_size * world
    vocab_size = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} does not fit the padded vocabulary of {world} shards x "
                         f"{local_size} = {padded}")
    start = rank * local_size
    valid = min(max(vocab_size - start, 0), local_size)
    return _Shard(tp_group, world, start, local_size, valid, vocab_size)


def _chunk_tokens(chunk_size: Optional[int], local_size: int) -> int:
    """Tokens per chunk: ``chunk_size``, or by default as many as fill CHUNK_ELEMENTS float32 at V/tp columns."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(local_size, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    return int(chunk_size)


def _check_args(logits: torch.Tensor, temperature: float) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V/tp] with at least one token dimension, got {list(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _flat_ids(ids: torch.Tensor, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids ``[...]`` or ``[..., K]`` matching logits ``[..., V/tp]`` -> ``[n, K]`` int64, checked in [0, vocab_size)."""
    lead = logits.shape[:-1]
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.shape == lead:
        ids = ids.unsqueeze(-1)
    elif ids.shape[:-1] != lead:
        raise ValueError(f"ids of shape {list(ids.shape)} do not match logits {list(logits.shape)}: expected "
                         f"{list(lead)} (one id per position) or {list(lead)} + [K]")
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        values = ids[bad].unique()
        raise ValueError(f"ids outside the vocabulary [0, {vocab_size}) (padding or invalid): "
                         f"{values[:8].tolist()}{' ...' if values.numel() > 8 else ''}")
    return ids.reshape(-1, ids.shape[-1]).long()


def _all_gather_rows(t: torch.Tensor, shard: _Shard) -> torch.Tensor:
    """``[n, S]`` on every rank -> ``[tp, n, S]`` (one collective; none at TP 1)."""
    if shard.world == 1:
        return t.unsqueeze(0)
    out = t.new_empty(shard.world * t.shape[0], *t.shape[1:])
    dist.all_gather_into_tensor(out, t.contiguous(), group=shard.group)
    return out.view(shard.world, *t.shape)


def _shifted(rows: torch.Tensor, temperature: float, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = rows / T - shift[:, None] in float32 (``rows`` [c, v] any float dtype, ``out`` [c, v] float32)."""
    if temperature == 1.0:
        return torch.sub(rows, shift.unsqueeze(-1), out=out)
    return out.copy_(rows).div_(temperature).sub_(shift.unsqueeze(-1))


def _local_softmax_stats(logits: torch.Tensor, shard: _Shard, temperature: float, chunk_size: int,
                         with_entropy: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Over this rank's real columns of ``[n, V/tp]``, per position: m_r = max(x), log s_r with s_r = sum(e),
    e = exp(x - m_r), and optionally the entropy of the local softmax H_r = log s_r - sum(e * (x - m_r)) / s_r
    (each ``[n]``). A rank holding only padding gives m_r = -inf, log s_r = 0, H_r = 0."""
    n = logits.shape[0]
    m = torch.full((n,), float("-inf"), device=logits.device)
    log_s = torch.zeros(n, device=logits.device)
    ent = torch.zeros(n, device=logits.device) if with_entropy else None
    if shard.valid == 0 or n == 0:
        return m, log_s, ent
    real = logits[:, :shard.valid]
    work = torch.empty(min(chunk_size, n), shard.valid, device=logits.device)
    exp_work = torch.empty_like(work) if with_entropy else None
    for start in range(0, n, chunk_size):
        rows = real[start:start + chunk_size]
        c, part = rows.shape[0], slice(start, start + chunk_size)
        m[part] = rows.amax(-1).float().div_(temperature)
        w = _shifted(rows, temperature, m[part], work[:c])  # x - m_r <= 0
        if with_entropy:
            e = torch.exp(w, out=exp_work[:c])
            s = e.sum(-1)
            ent[part] = s.log() - torch.bmm(e.unsqueeze(1), w.unsqueeze(2)).view(c) / s
        else:
            s = w.exp_().sum(-1)
        log_s[part] = s.log()
    return m, log_s, ent


def _merge_shards(m_r: torch.Tensor, log_s_r: torch.Tensor, ent_r: Optional[torch.Tensor]):
    """Per-rank stats ``[tp, n]`` -> M = max_r m_r, L = lse - M = log sum_r exp(m_r - M + log s_r) and
    H = sum_r w_r H_r - sum_r w_r log w_r with w_r = exp(m_r - M + log s_r - L), the softmax mass on rank r
    (each ``[n]``). Keeping lse as M + L and H as a mixture avoids cancellation for logits of magnitude 1e4."""
    big_m = m_r.amax(0)
    a = m_r - big_m + log_s_r
    norm = torch.logsumexp(a, 0)
    if ent_r is None:
        return big_m, norm, None
    w = torch.exp(a - norm)
    return big_m, norm, (w * ent_r).sum(0) - torch.special.xlogy(w, w).sum(0)


def _owned(ids: torch.Tensor, shard: _Shard) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local column of each id ``[n, K]`` (clamped into the real columns) and whether this rank holds it."""
    local = ids - shard.start
    owned = (local >= 0) & (local < shard.valid)
    return local.clamp(0, max(shard.valid, 1) - 1), owned


def _softmax_grad_chunk(rows, temperature, big_m, norm, ent, g_norm, g_ent, out, scratch):
    """out ``[c, v]`` float32 = d(g_norm * L + g_ent * H)/d logits = p * (g_norm - g_ent * (log p + H)) / T with
    p = exp(x - M) * exp(-L) recomputed from ``rows``; a term whose grad is None is skipped (both None: zeros)."""
    if g_norm is None and g_ent is None:
        return out.zero_()
    w = _shifted(rows, temperature, big_m, out)  # x - M <= 0, log p = w - L
    scale = torch.exp(-norm) / temperature
    if g_ent is None:
        return w.exp_().mul_((g_norm * scale).unsqueeze(-1))
    e = torch.exp(w, out=scratch)
    slope = -g_ent * scale  # p (g_norm - g_ent (w - L + H)) / T = e * (offset + slope * w)
    offset = scale * ((0.0 if g_norm is None else g_norm) - g_ent * (ent - norm))
    return torch.addcmul(offset.unsqueeze(-1), w, slope.unsqueeze(-1), out=w).mul_(e)


class _VocabStats(torch.autograd.Function):
    """Sharded logits ``[n, V/tp]`` -> (L ``[n]``, H ``[n]``, x at ids ``[n, K]``) of x = logits / T over the full
    vocabulary, relative to a per-position constant M (no gradient): M = max_v x_v and L = logsumexp(x) - M when
    ``softmax``, else M = 0 and L = None; H (``entropy``) is the entropy; x_ids - M is None without ``ids``.
    Saves the logits, ids and the [n] stats; backward recomputes p chunk by chunk, without communication:
    dlogits = p * (g_L - g_H (log p + H)) / T + onehot_local(ids) * g_ids / T."""

    @staticmethod
    def forward(ctx, logits, ids, shard, temperature, chunk_size, softmax, entropy):
        cols = []
        if softmax:
            cols += [t.unsqueeze(-1) for t in _local_softmax_stats(logits, shard, temperature, chunk_size, entropy)
                     if t is not None]
        if ids is not None:
            local, owned = _owned(ids, shard)
            cols.append(torch.where(owned, logits.gather(1, local).float() / temperature, 0.0))
        gathered = _all_gather_rows(torch.cat(cols, -1), shard)  # [tp, n, S]
        big_m = norm = ent = x_ids = None
        if softmax:
            big_m, norm, ent = _merge_shards(gathered[..., 0], gathered[..., 1], gathered[..., 2] if entropy else None)
        if ids is not None:
            x_ids = gathered[..., -ids.shape[1]:].sum(0)  # one owner per id: the others add 0
            if softmax:
                x_ids = x_ids - big_m.unsqueeze(-1)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, ids, big_m, norm, ent)
        ctx.shard, ctx.temperature, ctx.chunk_size = shard, temperature, chunk_size
        return norm, ent, x_ids

    @staticmethod
    @once_differentiable
    def backward(ctx, g_norm, g_ent, g_ids):
        logits, ids, big_m, norm, ent = ctx.saved_tensors
        shard, temperature, chunk_size = ctx.shard, ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        grad[:, shard.valid:] = 0
        n, v = logits.shape[0], shard.valid
        if v == 0 or n == 0:
            return grad, None, None, None, None, None, None
        if g_ids is not None:
            local, owned = _owned(ids, shard)
            g_ids = torch.where(owned, g_ids.float() / temperature, 0.0)
        in_place = logits.dtype == torch.float32  # compute straight into the grad buffer
        work = None if in_place else torch.empty(min(chunk_size, n), v, device=logits.device)
        scratch = torch.empty(min(chunk_size, n), v, device=logits.device) if g_ent is not None else None
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            target = grad[rows, :v]
            c = target.shape[0]
            out = target if in_place else work[:c]
            _softmax_grad_chunk(logits[rows, :v], temperature, _part(big_m, rows), _part(norm, rows),
                                _part(ent, rows), _part(g_norm, rows), _part(g_ent, rows), out,
                                None if scratch is None else scratch[:c])
            if g_ids is not None:
                out.scatter_add_(1, local[rows], g_ids[rows])  # ids held elsewhere add 0
            if not in_place:
                target.copy_(out)
        return grad, None, None, None, None, None, None


def _part(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


def _vocab_stats(logits, ids, tp_group, temperature, vocab_size, chunk_size, softmax, entropy):
    """Validate, flatten to ``[n, V/tp]`` / ``[n, K]`` and run the core; returns (L, H, x_ids) flat."""
    _check_args(logits, temperature)
    shard = _shard(logits, tp_group, vocab_size)
    chunk = _chunk_tokens(chunk_size, shard.local_size)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_ids = None if ids is None else _flat_ids(ids, logits, shard.vocab_size)
    return _VocabStats.apply(flat, flat_ids, shard, float(temperature), chunk, softmax, entropy)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, tp_group, temperature: float = 1.0,
                vocab_size: Optional[int] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits / T)[ids] over the full unpadded vocabulary: logits ``[..., V/tp]``, ids ``[...]`` -> ``[...]``
    or ids ``[..., K]`` -> ``[..., K]`` (float32). Backward, local shard only: dlogits_v = (sum_k g_k [v == id_k]
    - p_v sum_k g_k) / T. ids outside [0, vocab_size) raise a ValueError (one host sync)."""
    norm, _, x_ids = _vocab_stats(logits, ids, tp_group, temperature, vocab_size, chunk_size, True, False)
    return (x_ids - norm.unsqueeze(-1)).view(ids.shape)  # (x_i - M) - (lse - M)


def entropy(logits: torch.Tensor, tp_group, temperature: float = 1.0, vocab_size: Optional[int] = None,
            chunk_size: Optional[int] = None) -> torch.Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits / T) over the full unpadded vocabulary: ``[..., V/tp]`` ->
    ``[...]`` float32. Backward: dH/dx_v = -p_v (log p_v + H), divided by T for the logits."""
    _, ent, _ = _vocab_stats(logits, None, tp_group, temperature, vocab_size, chunk_size, True, True)
    return ent.view(logits.shape[:-1])


def gather_at(logits: torch.Tensor, ids: torch.Tensor, tp_group, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Raw logits at global ids: ``[..., V/tp]`` with ids ``[..., K]`` (or ``[...]``) -> ``[..., K]`` (or ``[...]``)
    float32. Each id lives on one rank: local gather, 0 elsewhere, summed over TP (one all-gather of [n, K]).
    Backward scatters the grad into the owning shard, without communication."""
    _, _, x_ids = _vocab_stats(logits, ids, tp_group, 1.0, vocab_size, None, False, False)
    return x_ids.view(ids.shape)


def _pack_candidates(floats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, a] float32 and [n, k] int64 ids -> [n, a + k] int32 (floats bit-cast, ids < 2^31): one message."""
    return torch.cat([floats.view(torch.int32), ids.int()], -1)


@torch.no_grad()
def topk(logits: torch.Tensor, k: int, tp_group, temperature: float = 1.0, vocab_size: Optional[int] = None,
         chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact global top-k of log softmax(logits / T) over the unpadded vocabulary: ``[..., V/tp]`` -> (values
    ``[..., k]`` float32 full-vocabulary log-probs, ids ``[..., k]`` int64 global ids), sorted descending.

    Each rank takes its local top-k over its real columns (padding never wins) and its local softmax stats
    (m_r, log s_r); one all-gather of [m_r, log s_r, k values, k ids] per position (TP * (2 + 2k) * 4 bytes)
    gives every rank the TP*k candidates, of which the top-k is the global one. No gradient: the result is a
    constant (the teacher's support and its log-probs are targets)."""
    _check_args(logits, temperature)
    shard = _shard(logits, tp_group, vocab_size)
    chunk = _chunk_tokens(chunk_size, shard.local_size)
    if not 0 < k <= shard.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={shard.vocab_size}], got {k}")
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    m, log_s, _ = _local_softmax_stats(flat, shard, temperature, chunk, False)
    values = torch.full((n, k), float("-inf"), device=flat.device)
    ids = torch.zeros(n, k, dtype=torch.long, device=flat.device)
    local_k = min(k, shard.valid)
    if local_k:
        top = flat[:, :shard.valid].topk(local_k, dim=-1)
        values[:, :local_k] = top.values.float() / temperature
        ids[:, :local_k] = top.indices + shard.start
    floats = torch.cat([m.unsqueeze(-1), log_s.unsqueeze(-1), values], -1)
    gathered = _all_gather_rows(_pack_candidates(floats, ids), shard)  # [tp, n, 2 + 2k] int32
    stats = gathered[..., :2 + k].contiguous().view(torch.float32)
    big_m, norm, _ = _merge_shards(stats[..., 0], stats[..., 1], None)
    cand_values = stats[..., 2:].permute(1, 0, 2).reshape(n, -1)  # [n, tp*k]
    cand_ids = gathered[..., 2 + k:].permute(1, 0, 2).reshape(n, -1)
    best = cand_values.topk(k, dim=-1)
    log_probs = best.values - big_m.unsqueeze(-1) - norm.unsqueeze(-1)
    out_shape = (*logits.shape[:-1], k)
    return log_probs.view(out_shape), cand_ids.gather(1, best.indices).long().view(out_shape)


def topk_lsm_loss_parallel(student_logits: torch.Tensor, support_ids: torch.Tensor,
                           teacher_logprobs_at_support: torch.Tensor, loss_mask: torch.Tensor, tp_group,
                           vocab_size: Optional[int] = None, **loss_kwargs):
    """Teacher-TopK/LSM loss on vocab-sharded student logits ``[..., V/tp]``: the student's logits at the teacher's
    support ``[..., K]`` via ``gather_at``, then ``losses.topk_lsm_loss`` (the one implementation of the formula;
    ``loss_kwargs``: gates, log_ratio_clip, support_mask, num_tokens). Returns ``(loss, metrics)``."""
    from .losses import topk_lsm_loss

    student_at_support = gather_at(student_logits, support_ids, tp_group, vocab_size)
    return topk_lsm_loss(student_at_support, teacher_logprobs_at_support, loss_mask, **loss_kwargs)
