"""The output layer fused with the vocab-parallel ops: log-probs, entropy, top-K and LSM from hidden states,
never holding the logits ``[n, V/tp]`` nor their gradient.

hidden ``[..., h]`` (the final hidden states, the same on every TP rank), weight ``[V/tp, h]`` (this rank's shard
of the output layer, or of the tied word embeddings). The logits x = hidden @ weight^T / T are recomputed chunk by
chunk (``chunk_tokens`` positions, default: as many as fill 128 MiB of float32) in float32 (bf16/fp16 inputs are
upcast; the weight once per call, an O(V/tp * h) float32 copy), fed to the same chunked reductions as the ops on
logits (``core``). Backward recomputes each chunk's logits, forms dlogits [c, V/tp] in float32 and accumulates
dhidden = dlogits @ W and dW = dlogits^T @ hidden (float32 accumulators), then all-reduces dhidden over the TP
group, as Megatron's column-parallel output layer does: the hidden gradient is the full one on every rank.

Cost against output layer + ops on logits: the forward matmul runs twice (forward and backward): 4 instead of 3
GEMMs of [n, h] x [h, V/tp]. Memory: O(chunk * V/tp + V/tp * h), independent of n.

``fused_linear_token_loss`` is the exception, for a loss that is a sum of per-position functions of the sampled
token's log-prob (the sampled-token OPD loss, SFT): it takes the loss as a callable on each chunk's log-probs and
computes the gradients of hidden and weight in the forward, from the chunk's logits while they are at hand
(3 GEMMs, as unfused); the backward only scales them.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..losses import topk_lsm_loss
from .core import (CHUNK_ELEMENTS, Shard, VocabStats, all_gather_rows, check_temperature, chunk_stats, flat_ids,
                   merge_shards, owned, shard_of, topk_from_chunks)
from .core import chunk_tokens as tokens_per_chunk


class LinearChunks:
    """Chunk source whose logits are hidden ``[n, h]`` @ weight ``[V/tp, h]``^T, computed per chunk in float32;
    backward accumulates the gradients of hidden and weight."""

    def __init__(self, shard: Shard, hidden: torch.Tensor, weight: torch.Tensor):
        self.shard, self.hidden, self.weight = shard, hidden, weight
        self.n, self.device = hidden.shape[0], hidden.device
        self._w32 = None

    def _real_weight(self) -> torch.Tensor:
        """float32 rows of the real ids ``[valid, h]`` (a view for a float32 weight, else one copy per call)."""
        if self._w32 is None:
            self._w32 = self.weight[:self.shard.valid].float()
        return self._w32

    def rows(self, part: slice, buffer: torch.Tensor) -> torch.Tensor:
        """Logits of the chunk's real columns ``[c, valid]`` float32, written into ``buffer``."""
        return torch.mm(self.hidden[part].float(), self._real_weight().t(), out=buffer)

    def _token_chunks(self, k: int):
        """Slices of positions for the sparse ops at k ids: [c, k, h] float32 within CHUNK_ELEMENTS."""
        step = max(1, CHUNK_ELEMENTS // max(k * self.hidden.shape[1], 1))
        return (slice(s, s + step) for s in range(0, self.n, step))

    def at(self, local: torch.Tensor) -> torch.Tensor:
        """Logits at local columns ``[n, K]``: hidden_i . weight_{id}, float32 ``[n, K]``."""
        out = torch.empty(local.shape, device=self.device)
        for part in self._token_chunks(local.shape[1]):
            rows = self.weight[local[part]].float()  # [c, K, h]
            out[part] = torch.bmm(rows, self.hidden[part].float().unsqueeze(-1)).squeeze(-1)
        return out

    def begin_backward(self) -> None:
        self.g_hidden = torch.zeros(self.hidden.shape, device=self.device)
        self.g_weight = torch.zeros(self.weight.shape, device=self.device)

    def grad_out(self, part: slice, work: torch.Tensor) -> torch.Tensor:
        return work

    def add_chunk_grad(self, part: slice, out: torch.Tensor) -> None:
        """dlogits ``[c, valid]`` -> dhidden[part] = out @ W, dW[:valid] += out^T @ hidden[part]."""
        self.g_hidden[part].addmm_(out, self._real_weight())
        self.g_weight[:self.shard.valid].addmm_(out.t(), self.hidden[part].float())

    def add_grad_at(self, local: torch.Tensor, g: torch.Tensor) -> None:
        """Gradient ``g`` ``[n, K]`` at local columns (0 where not owned): dhidden_i += sum_k g_ik W_{id_ik},
        dW_{id_ik} += g_ik hidden_i."""
        for part in self._token_chunks(local.shape[1]):
            g_part = g[part]
            self.g_hidden[part] += torch.bmm(g_part.unsqueeze(1), self.weight[local[part]].float()).squeeze(1)
            self.g_weight.index_add_(0, local[part].reshape(-1),
                                     (g_part.unsqueeze(-1) * self.hidden[part].float().unsqueeze(1)).flatten(0, 1))

    def float_grads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The float32 accumulators, the hidden one all-reduced over TP (the full hidden gradient on every rank)."""
        if self.shard.world > 1:
            dist.all_reduce(self.g_hidden, group=self.shard.group)
        return self.g_hidden, self.g_weight

    def grads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        g_hidden, g_weight = self.float_grads()
        return g_hidden.to(self.hidden.dtype), g_weight.to(self.weight.dtype)


def _source(hidden: torch.Tensor, weight: torch.Tensor, tp_group, temperature: float,
            vocab_size: Optional[int]) -> LinearChunks:
    """Validate hidden ``[..., h]`` and weight ``[V/tp, h]``; a source over hidden flattened to ``[n, h]``."""
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be float tensors, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., h] and weight [V/tp, h] do not fit: hidden {list(hidden.shape)}, "
                         f"weight {list(weight.shape)}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device}, weight on {weight.device}")
    check_temperature(temperature)
    shard = shard_of(weight.shape[0], tp_group, vocab_size)
    return LinearChunks(shard, hidden.reshape(-1, hidden.shape[-1]), weight)


def _fused_stats(hidden, weight, ids, tp_group, temperature, vocab_size, chunk, softmax, entropy):
    """``core.VocabStats`` on the fused source; returns (L, H, x_ids) flat."""
    source = _source(hidden, weight, tp_group, temperature, vocab_size)
    if ids is not None:
        ids = flat_ids(ids, hidden.shape[:-1], source.shard.vocab_size, f"hidden {list(hidden.shape)}")
    return VocabStats.apply(LinearChunks, ids, source.shard, float(temperature),
                            tokens_per_chunk(chunk, source.shard.local_size, "chunk_tokens"), softmax, entropy,
                            source.hidden, weight)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group=None,
                          temperature: float = 1.0, vocab_size: Optional[int] = None,
                          chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """log softmax(hidden @ W^T / T)[labels] over the full unpadded vocabulary: hidden ``[..., h]``, labels ``[...]``
    -> ``[...]`` (or ``[..., K]`` -> ``[..., K]``) float32; equals ``logprobs_at`` on the output layer's logits."""
    norm, _, x_ids = _fused_stats(hidden, weight, labels, tp_group, temperature, vocab_size, chunk_tokens, True, False)
    return (x_ids - norm.unsqueeze(-1)).view(labels.shape)


def fused_linear_entropy(hidden: torch.Tensor, weight: torch.Tensor, tp_group=None, temperature: float = 1.0,
                         vocab_size: Optional[int] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """H = -sum_v p_v log p_v of p = softmax(hidden @ W^T / T) over the unpadded vocabulary: ``[..., h]`` ->
    ``[...]`` float32; equals ``entropy`` on the output layer's logits."""
    _, ent, _ = _fused_stats(hidden, weight, None, tp_group, temperature, vocab_size, chunk_tokens, True, True)
    return ent.view(hidden.shape[:-1])


def fused_linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, tp_group=None, temperature: float = 1.0,
                      vocab_size: Optional[int] = None,
                      chunk_tokens: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact global top-k of log softmax(hidden @ W^T / T): ``[..., h]`` -> (values ``[..., k]`` float32, ids
    ``[..., k]`` int64), sorted descending, no gradient; equals ``topk`` on the output layer's logits."""
    source = _source(hidden, weight, tp_group, temperature, vocab_size)
    values, ids = topk_from_chunks(source, k, float(temperature),
                                   tokens_per_chunk(chunk_tokens, source.shard.local_size, "chunk_tokens"))
    out_shape = (*hidden.shape[:-1], k)
    return values.view(out_shape), ids.view(out_shape)


def fused_linear_gather_at(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, tp_group=None,
                           vocab_size: Optional[int] = None) -> torch.Tensor:
    """Raw logits hidden @ W^T at global ids: ``[..., h]`` with ids ``[..., K]`` -> ``[..., K]`` float32, as
    per-id dot products (no [n, V/tp] chunk); equals ``gather_at`` on the output layer's logits."""
    _, _, x_ids = _fused_stats(hidden, weight, ids, tp_group, 1.0, vocab_size, None, False, False)
    return x_ids.view(ids.shape)


def fused_linear_lsm_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor,
                          teacher_topk_logprobs: torch.Tensor, loss_mask: torch.Tensor, tp_group=None,
                          vocab_size: Optional[int] = None, **loss_kwargs):
    """Teacher-TopK/LSM loss from hidden states: the student's logits at the teacher's support ``[..., K]`` via
    ``fused_linear_gather_at``, then ``losses.topk_lsm_loss`` (``loss_kwargs``: gates, log_ratio_clip,
    support_mask, num_tokens). Returns ``(loss, metrics)``; equals ``topk_lsm_loss_parallel`` on the logits."""
    student_at_support = fused_linear_gather_at(hidden, weight, topk_ids, tp_group, vocab_size)
    return topk_lsm_loss(student_at_support, teacher_topk_logprobs, loss_mask, **loss_kwargs)


def chunks_at(n: int, chunk: int, starts: Optional[torch.Tensor] = None) -> List[slice]:
    """Consecutive slices covering ``[0, n)``, each starting at a position where ``starts`` ``[n]`` (bool) allows
    (any position when None): as long as possible within ``chunk`` positions, longer only where no allowed start
    lies within ``chunk`` of the previous one."""
    if starts is None:
        return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    allowed = torch.cat([starts.reshape(-1).nonzero().reshape(-1).cpu(), torch.tensor([0, n])]).unique().tolist()
    out, begin, i = [], 0, 0
    while begin < n:
        while i + 1 < len(allowed) and allowed[i + 1] <= begin:
            i += 1
        j = i + 1  # the first allowed start after begin; move on while the chunk stays within bounds
        while j + 1 < len(allowed) and allowed[j + 1] <= begin + chunk:
            j += 1
        out.append(slice(begin, allowed[j]))
        begin = allowed[j]
    return out


class TokenLossInForward(torch.autograd.Function):
    """(sum over chunks of token_loss(part, lp_part) 0-d, lp ``[n]``) with lp_t = log softmax(x_t)[label_t]; the
    gradients of hidden and weight are computed chunk by chunk in the forward and scaled in the backward.

    Per chunk of positions (every TP rank runs the same chunks): the raw logits ``[c, V/tp]`` once; the local max,
    log-sum-exp and label logit, all-gathered over TP ``[tp, c, 3]`` into lp; g = d token_loss / d lp by autograd
    on ``[c]``; dlogits = g (onehot(label) - p) / T from the same logits; dhidden += dlogits @ W and
    dW += dlogits^T @ hidden. The loss's value and its gradient both come from the chunk alone, so ``token_loss``
    may use only the positions of ``part``."""

    @staticmethod
    def forward(ctx, token_loss, parts, shard, temperature, need_grad, labels, hidden, weight):
        source = LinearChunks(shard, hidden, weight)
        if need_grad:
            source.begin_backward()
        n, v, device = source.n, shard.valid, source.device
        local, mine = owned(labels.unsqueeze(-1), shard)
        local, mine = local.squeeze(-1), mine.squeeze(-1)
        lp = torch.empty(n, device=device)
        total = torch.zeros((), device=device)
        width = max((p.stop - p.start for p in parts), default=0)
        work = torch.empty(width, v, device=device)
        for part in parts:
            c = part.stop - part.start
            stats = torch.zeros(c, 3, device=device)
            stats[:, 0] = float("-inf")  # a rank holding only padding: m = -inf, log s = 0, no label
            if v:
                rows = source.rows(part, work[:c])  # raw logits [c, valid]
                stats[:, 2] = torch.where(mine[part], rows.gather(1, local[part, None])[:, 0] / temperature, 0.0)
                stats[:, 0], stats[:, 1], _, e = chunk_stats(rows, temperature, rows)  # e = exp(x - m_r) in place
            gathered = all_gather_rows(stats, shard)  # [tp, c, 3]
            big_m, norm, _ = merge_shards(gathered[..., 0], gathered[..., 1], None)
            lp[part] = (gathered[..., 2].sum(0) - big_m) - norm
            with torch.enable_grad():
                lp_part = lp[part].detach().requires_grad_(need_grad)
                try:
                    loss = token_loss(part, lp_part)
                except ValueError as err:  # its positions are the chunk's: say where that chunk lies
                    raise ValueError(f"{err} (in the chunk of flat positions [{part.start}, {part.stop}) of "
                                     f"{n})") from err
            total += loss.detach().float()
            if not (need_grad and v and loss.requires_grad):
                continue
            (g,) = torch.autograd.grad(loss, lp_part)
            g = g.float() / temperature
            # dlogits = g (onehot - p) / T with p = e * exp(m_r - M - L) on this rank's columns
            e.mul_((-g * torch.exp(stats[:, 0] - big_m - norm)).unsqueeze(-1))
            e.scatter_add_(1, local[part, None], torch.where(mine[part], g, 0.0).unsqueeze(-1))
            source.add_chunk_grad(part, e)
        ctx.mark_non_differentiable(lp)
        if need_grad:
            ctx.save_for_backward(*source.float_grads())
        ctx.dtypes, ctx.consumed = (hidden.dtype, weight.dtype), False
        return total, lp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, g_lp):
        """Scales the forward's float32 gradients in place (no second [V/tp, h] buffer): it runs once per forward."""
        if ctx.consumed:
            raise RuntimeError("fused_linear_token_loss: backward through the same forward twice (retain_graph) is "
                               "not supported; its gradients were scaled in place by the first")
        ctx.consumed = True
        g_hidden, g_weight = ctx.saved_tensors
        return (None,) * 6 + (g_hidden.mul_(g_total).to(ctx.dtypes[0]), g_weight.mul_(g_total).to(ctx.dtypes[1]))


def fused_linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                            token_loss: Callable[[slice, torch.Tensor], torch.Tensor], tp_group=None,
                            temperature: float = 1.0, vocab_size: Optional[int] = None,
                            chunk_tokens: Optional[int] = None,
                            chunk_starts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A loss of the labels' log-probs, summed over chunks, with its gradient computed in the forward.

    hidden ``[..., h]``, weight ``[V/tp, h]``, labels ``[...]``; lp = log softmax(hidden @ W^T / T)[labels] over
    the unpadded vocabulary. ``token_loss(part, lp_part)`` -> 0-d: the loss of the flat positions ``part``
    (a slice of ``[n]``) from their log-probs ``lp_part`` ``[c]`` float32, differentiable in lp_part and using
    no other position's log-prob. ``chunk_starts`` ``[...]`` bool: where a chunk may begin (None: anywhere), e.g.
    the starts of gate segments so that a segment's statistic lies in one chunk; a chunk grows past
    ``chunk_tokens`` only to reach the next allowed start. Returns (sum of the chunk losses 0-d float32, lp ``[...]``
    float32 without gradient); the loss back-propagates into hidden and weight exactly as
    ``sum token_loss(part, fused_linear_logprobs(...)[part])`` does, with 3 GEMMs instead of 4 and the logits of
    one chunk at a time (held across the all-gather of the chunk's [c, 3] statistics over TP)."""
    source = _source(hidden, weight, tp_group, temperature, vocab_size)
    labels_flat = flat_ids(labels, hidden.shape[:-1], source.shard.vocab_size, f"hidden {list(hidden.shape)}")[:, 0]
    if chunk_starts is not None and chunk_starts.shape != labels.shape:
        raise ValueError(f"chunk_starts has shape {list(chunk_starts.shape)}, labels {list(labels.shape)}")
    parts = chunks_at(source.n, tokens_per_chunk(chunk_tokens, source.shard.local_size, "chunk_tokens"),
                      chunk_starts)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, lp = TokenLossInForward.apply(token_loss, parts, source.shard, float(temperature), need_grad, labels_flat,
                                         source.hidden, weight)
    return total, lp.view(labels.shape)
