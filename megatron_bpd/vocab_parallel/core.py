"""Chunked softmax reductions over a vocabulary sharded on the tensor-parallel group, fed chunk by chunk.

A *chunk source* yields this rank's float logits ``[c, V/tp]`` for a slice of the ``n`` positions and takes the
gradient of each chunk back: ``LogitsChunks`` slices given logits, ``fused.LinearChunks`` recomputes
hidden @ weight^T (the fused output layer); ``head.LMHead`` runs every op on either. Everything here is written once
against that interface.

Rank r holds global ids [r*V/tp, (r+1)*V/tp); ids >= ``vocab_size`` are padding, sliced off before any softmax or
top-K. All math is float32 on x = logits / T (T > 0).

``VocabStats`` (autograd) returns, per position, logsumexp(x) as M + L (M = max x, a constant; L kept separately
so that nothing of magnitude |x| is rounded), the entropy H = -sum p log p and x at ids; ``topk_from_chunks``
returns the exact global top-K. Memory: one float32 ``[chunk, V/tp]`` work buffer (two for the entropy); backward
recomputes the softmax chunk by chunk from the source and the [n] statistics. Communication: forward is one
all-gather over TP of the local statistics ``[n, 2 (+1 entropy) + K]`` float32 per rank; backward needs none
(the fused source all-reduces its hidden-state gradient, as Megatron's column-parallel output layer does).
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 25  # default chunk: 128 MiB of float32 work, e.g. 220 tokens at V/tp = 151936


@dataclass(frozen=True)
class Shard:
    """This rank's slice of the (padded) vocabulary: local columns [0, valid) are real ids [start, start + valid);
    columns [valid, local_size) are padding."""

    group: Optional[dist.ProcessGroup]
    world: int
    start: int
    local_size: int
    valid: int
    vocab_size: int


def shard_of(local_size: int, tp_group, vocab_size: Optional[int]) -> Shard:
    """Locate this rank's shard of ``local_size`` columns; ``tp_group=None`` means a single unsharded process."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    padded = local_size * world
    vocab_size = padded if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} does not fit the padded vocabulary of {world} shards x "
                         f"{local_size} = {padded}")
    start = rank * local_size
    valid = min(max(vocab_size - start, 0), local_size)
    return Shard(tp_group, world, start, local_size, valid, vocab_size)


def chunk_tokens(chunk: Optional[int], local_size: int, name: str = "chunk_size") -> int:
    """Tokens per chunk: ``chunk``, or by default as many as fill CHUNK_ELEMENTS float32 at V/tp columns."""
    if chunk is None:
        return max(1, CHUNK_ELEMENTS // max(local_size, 1))
    if chunk < 1:
        raise ValueError(f"{name} must be >= 1 token, got {chunk}")
    return int(chunk)


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def flat_ids(ids: torch.Tensor, lead: torch.Size, vocab_size: int, what: str) -> torch.Tensor:
    """ids ``[...]`` or ``[..., K]`` for positions ``lead`` -> ``[n, K]`` int64, checked in [0, vocab_size)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.shape == lead:
        ids = ids.unsqueeze(-1)
    elif ids.shape[:-1] != lead:
        raise ValueError(f"ids of shape {list(ids.shape)} do not match {what}: expected "
                         f"{list(lead)} (one id per position) or {list(lead)} + [K]")
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        values = ids[bad].unique()
        raise ValueError(f"ids outside the vocabulary [0, {vocab_size}) (padding or invalid): "
                         f"{values[:8].tolist()}{' ...' if values.numel() > 8 else ''}")
    return ids.reshape(-1, ids.shape[-1]).long()


def all_gather_rows(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``[n, S]`` on every rank -> ``[tp, n, S]`` (one collective; none at TP 1)."""
    if shard.world == 1:
        return t.unsqueeze(0)
    out = t.new_empty(shard.world * t.shape[0], *t.shape[1:])
    dist.all_gather_into_tensor(out, t.contiguous(), group=shard.group)
    return out.view(shard.world, *t.shape)


class LogitsChunks:
    """Chunk source over given logits ``[n, V/tp]`` (any float dtype). Backward fills a gradient of the logits'
    dtype, computing straight into it for float32 logits."""

    def __init__(self, shard: Shard, logits: torch.Tensor):
        self.shard, self.logits = shard, logits
        self.n, self.device = logits.shape[0], logits.device

    def rows(self, part: slice, buffer: torch.Tensor) -> torch.Tensor:
        """Real columns of the chunk ``[c, valid]`` (a view; ``buffer`` unused)."""
        return self.logits[part, :self.shard.valid]

    def at(self, local: torch.Tensor) -> torch.Tensor:
        """Raw logits at local columns ``[n, K]`` -> ``[n, K]`` float32."""
        return self.logits.gather(1, local).float()

    def begin_backward(self) -> None:
        self.grad = torch.empty_like(self.logits)
        self.grad[:, self.shard.valid:] = 0

    def grad_out(self, part: slice, work: torch.Tensor) -> torch.Tensor:
        """Where the chunk's float32 gradient is computed: the gradient itself for float32 logits, else ``work``."""
        return self.grad[part, :self.shard.valid] if self.logits.dtype == torch.float32 else work

    def add_chunk_grad(self, part: slice, out: torch.Tensor) -> None:
        target = self.grad[part, :self.shard.valid]
        if out.data_ptr() != target.data_ptr():
            target.copy_(out)

    def add_grad_at(self, local: torch.Tensor, g: torch.Tensor) -> None:
        """Gradient ``g`` ``[n, K]`` at local columns (0 where not owned), the only gradient (no softmax term)."""
        self.grad.zero_()
        self.grad.scatter_add_(1, local, g.to(self.grad.dtype))

    def grads(self) -> Tuple[torch.Tensor]:
        return (self.grad,)


def shifted(rows: torch.Tensor, temperature: float, shift: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = rows / T - shift[:, None] in float32 (``rows`` [c, v] any float dtype, may be ``out`` itself)."""
    if temperature == 1.0:
        return torch.sub(rows, shift.unsqueeze(-1), out=out)
    if rows.data_ptr() != out.data_ptr():
        out.copy_(rows)
    return out.div_(temperature).sub_(shift.unsqueeze(-1))


def local_stats(source, temperature: float, chunk: int, with_entropy: bool, k: int = 0):
    """Over this rank's real columns, per position: m_r = max(x), log s_r with s_r = sum(e), e = exp(x - m_r),
    optionally H_r = log s_r - sum(e * (x - m_r)) / s_r (entropy of the local softmax) and the local top-``k`` of x
    (values ``[n, k]`` float32, global ids ``[n, k]``; -inf / 0 beyond the real columns). A rank holding only
    padding gives m_r = -inf, log s_r = 0, H_r = 0. Returns (m, log_s, H or None, top values, top ids)."""
    shard, n, device = source.shard, source.n, source.device
    m = torch.full((n,), float("-inf"), device=device)
    log_s = torch.zeros(n, device=device)
    ent = torch.zeros(n, device=device) if with_entropy else None
    top_values = torch.full((n, k), float("-inf"), device=device)
    top_ids = torch.zeros(n, k, dtype=torch.long, device=device)
    local_k = min(k, shard.valid)
    if shard.valid == 0 or n == 0:
        return m, log_s, ent, top_values, top_ids
    work = torch.empty(min(chunk, n), shard.valid, device=device)
    exp_work = torch.empty_like(work) if with_entropy else None
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        rows = source.rows(part, work[:min(chunk, n - start)])
        c = rows.shape[0]
        if local_k:
            top = rows.topk(local_k, dim=-1)
            top_values[part, :local_k] = top.values.float() / temperature
            top_ids[part, :local_k] = top.indices + shard.start
        m[part], log_s[part], h, _ = chunk_stats(rows, temperature, work[:c], exp_work[:c] if with_entropy else None)
        if with_entropy:
            ent[part] = h
    return m, log_s, ent, top_values, top_ids


def chunk_stats(rows: torch.Tensor, temperature: float, out: torch.Tensor, exp_out: Optional[torch.Tensor] = None):
    """One chunk of this rank's real columns ``rows`` ``[c, v]`` (any float dtype; may be ``out``) with x = rows / T
    -> (m_r = max x, log s_r, H_r or None, e), each ``[c]`` but e = exp(x - m_r) ``[c, v]`` float32: in ``out``,
    or with ``exp_out`` in ``exp_out`` (``out`` then keeps x - m_r) and the local entropy H_r computed."""
    m = rows.amax(-1).float().div_(temperature)
    w = shifted(rows, temperature, m, out)  # x - m_r <= 0
    if exp_out is None:
        e = w.exp_()
        return m, e.sum(-1).log(), None, e
    e = torch.exp(w, out=exp_out)
    s = e.sum(-1)
    log_s = s.log()
    return m, log_s, log_s - torch.bmm(e.unsqueeze(1), w.unsqueeze(2)).view(-1) / s, e


def merge_shards(m_r: torch.Tensor, log_s_r: torch.Tensor, ent_r: Optional[torch.Tensor]):
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


def owned(ids: torch.Tensor, shard: Shard) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local column of each id ``[n, K]`` (clamped into the real columns) and whether this rank holds it."""
    local = ids - shard.start
    mine = (local >= 0) & (local < shard.valid)
    return local.clamp(0, max(shard.valid, 1) - 1), mine


def owned_logits(source, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """x / T at global ids ``[n, K]`` where this rank holds the id, 0 elsewhere ``[n, K]`` float32: summed over TP,
    each id's logit (one owner per id)."""
    local, mine = owned(ids, source.shard)
    return torch.where(mine, source.at(local) / temperature, 0.0)


def _softmax_grad_chunk(rows, temperature, big_m, norm, ent, g_norm, g_ent, out, scratch):
    """out ``[c, v]`` float32 = d(g_norm * L + g_ent * H)/d logits = p * (g_norm - g_ent * (log p + H)) / T with
    p = exp(x - M) * exp(-L) recomputed from ``rows``; a term whose grad is None is skipped (both None: zeros)."""
    if g_norm is None and g_ent is None:
        return out.zero_()
    w = shifted(rows, temperature, big_m, out)  # x - M <= 0, log p = w - L
    scale = torch.exp(-norm) / temperature
    if g_ent is None:
        return w.exp_().mul_((g_norm * scale).unsqueeze(-1))
    e = torch.exp(w, out=scratch)
    slope = -g_ent * scale  # p (g_norm - g_ent (w - L + H)) / T = e * (offset + slope * w)
    offset = scale * ((0.0 if g_norm is None else g_norm) - g_ent * (ent - norm))
    return torch.addcmul(offset.unsqueeze(-1), w, slope.unsqueeze(-1), out=w).mul_(e)


def _part(t: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if t is None else t[rows]


class VocabStats(torch.autograd.Function):
    """Chunk source over ``inputs`` -> (L ``[n]``, H ``[n]``, x at ids ``[n, K]``) of x = logits / T over the full
    vocabulary, relative to a per-position constant M (no gradient): M = max_v x_v and L = logsumexp(x) - M when
    ``softmax``, else M = 0 and L = None; H (``entropy``) is the entropy; x_ids - M is None without ``ids``.
    Saves the inputs, ids and the [n] stats; backward recomputes p chunk by chunk, without communication:
    dlogits = p * (g_L - g_H (log p + H)) / T + onehot_local(ids) * g_ids / T, handed to the source per chunk."""

    @staticmethod
    def forward(ctx, source_cls, ids, shard, temperature, chunk, softmax, entropy, *inputs):
        source = source_cls(shard, *inputs)
        cols = []
        if softmax:
            m, log_s, ent, _, _ = local_stats(source, temperature, chunk, entropy)
            cols += [t.unsqueeze(-1) for t in (m, log_s, ent) if t is not None]
        if ids is not None:
            cols.append(owned_logits(source, ids, temperature))
        gathered = all_gather_rows(torch.cat(cols, -1), shard)  # [tp, n, S]
        big_m = norm = ent = x_ids = None
        if softmax:
            big_m, norm, ent = merge_shards(gathered[..., 0], gathered[..., 1], gathered[..., 2] if entropy else None)
        if ids is not None:
            x_ids = gathered[..., -ids.shape[1]:].sum(0)  # one owner per id: the others add 0
            if softmax:
                x_ids = x_ids - big_m.unsqueeze(-1)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(ids, big_m, norm, ent, *inputs)
        ctx.source_cls, ctx.shard, ctx.temperature, ctx.chunk = source_cls, shard, temperature, chunk
        return norm, ent, x_ids

    @staticmethod
    @once_differentiable
    def backward(ctx, g_norm, g_ent, g_ids):
        ids, big_m, norm, ent, *inputs = ctx.saved_tensors
        shard, temperature, chunk = ctx.shard, ctx.temperature, ctx.chunk
        source = ctx.source_cls(shard, *inputs)
        source.begin_backward()
        n, v = source.n, shard.valid
        if ids is not None:
            local, mine = owned(ids, shard)
        if g_ids is not None:
            g_ids = torch.where(mine, g_ids.float() / temperature, 0.0)
        if big_m is None:  # no softmax term: the gradient lives at the ids only
            if v and n:
                source.add_grad_at(local, g_ids if g_ids is not None else torch.zeros(ids.shape, device=ids.device))
        elif v and n:
            work = torch.empty(min(chunk, n), v, device=source.device)
            scratch = torch.empty_like(work) if g_ent is not None else None
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                c = min(chunk, n - start)
                out = source.grad_out(rows, work[:c])
                _softmax_grad_chunk(source.rows(rows, out), temperature, big_m[rows], norm[rows], _part(ent, rows),
                                    _part(g_norm, rows), _part(g_ent, rows), out,
                                    None if scratch is None else scratch[:c])
                if g_ids is not None:
                    out.scatter_add_(1, local[rows], g_ids[rows])  # ids held elsewhere add 0
                source.add_chunk_grad(rows, out)
        return (None,) * 7 + source.grads()


def _pack_candidates(floats: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[n, a] float32 and [n, k] int64 ids -> [n, a + k] int32 (floats bit-cast, ids < 2^31): one message."""
    return torch.cat([floats.view(torch.int32), ids.int()], -1)


@torch.no_grad()
def topk_from_chunks(source, k: int, temperature: float, chunk: int, at: Optional[torch.Tensor] = None):
    """Exact global top-k of log softmax(x) over the unpadded vocabulary -> (values ``[n, k]`` float32, global ids
    ``[n, k]`` int64), sorted descending. Each rank takes its local top-k over its real columns and its local
    softmax stats (m_r, log s_r) in one pass; one all-gather of [m_r, log s_r, k values, k ids] per position
    (TP * (2 + 2k) * 4 bytes) gives every rank the TP*k candidates, of which the top-k is the global one.
    With ``at`` (global ids ``[n, K]``): also log softmax(x)[at] ``[n, K]``, each id's owner adding x there to
    the same all-gather, so the vocabulary is read once: (values, ids, log-probs at ``at``)."""
    shard, n = source.shard, source.n
    if not 0 < k <= shard.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={shard.vocab_size}], got {k}")
    m, log_s, _, values, ids = local_stats(source, temperature, chunk, False, k)
    floats = [m.unsqueeze(-1), log_s.unsqueeze(-1), values]
    if at is not None:
        floats.append(owned_logits(source, at, temperature))
    width = 2 + k + (0 if at is None else at.shape[1])
    gathered = all_gather_rows(_pack_candidates(torch.cat(floats, -1), ids), shard)  # [tp, n, width + k] int32
    stats = gathered[..., :width].contiguous().view(torch.float32)
    big_m, norm, _ = merge_shards(stats[..., 0], stats[..., 1], None)

    def log_softmax(x):  # x - M - L, never x - (M + L): no rounding at |x| ~ 1e4
        return x - big_m.unsqueeze(-1) - norm.unsqueeze(-1)

    cand_values = stats[..., 2:2 + k].permute(1, 0, 2).reshape(n, -1)  # [n, tp*k]
    cand_ids = gathered[..., width:].permute(1, 0, 2).reshape(n, -1)
    best = cand_values.topk(k, dim=-1)
    top = (log_softmax(best.values), cand_ids.gather(1, best.indices).long())
    if at is None:
        return top
    return (*top, log_softmax(stats[..., 2 + k:].sum(0)))  # one owner per id: the others add 0
