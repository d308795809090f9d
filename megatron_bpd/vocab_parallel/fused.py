"""The fused output layer's chunk source and loss: logits recomputed from hidden states, never held (``head``).

hidden ``[n, h]`` (the final hidden states, the same on every TP rank), weight ``[V/tp, h]`` (this rank's shard
of the output layer, or of the tied word embeddings). ``LinearChunks`` recomputes the logits x = hidden @ weight^T
chunk by chunk in float32 (bf16/fp16 inputs are upcast; the weight once per call, an O(V/tp * h) float32 copy) for
the chunked reductions of ``core``. Backward recomputes each chunk's logits, forms dlogits [c, V/tp] in float32
and accumulates dhidden = dlogits @ W and dW = dlogits^T @ hidden (float32 accumulators), then all-reduces dhidden
over the TP group, as Megatron's column-parallel output layer does: the hidden gradient is the full one on every
rank. Cost against output layer + ops on logits: the forward matmul runs twice (forward and backward): 4 instead
of 3 GEMMs of [n, h] x [h, V/tp]. Memory: O(chunk * V/tp + V/tp * h), independent of n.

``TokenLossInForward`` is the exception, for a loss that is a sum of per-position functions of the sampled token's
log-prob (the sampled-token OPD loss, SFT): it takes the loss as a callable on each chunk's log-probs and computes
the gradients of hidden and weight in the forward, from the chunk's logits while they are at hand (3 GEMMs, as
unfused); the backward only scales them.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .core import CHUNK_ELEMENTS, Shard, all_gather_rows, chunk_stats, merge_shards, owned


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
    """(sum over chunks of token_loss(part, lp_part) 0-d, lp ``[n]``, raw logits at ``extra`` ids ``[n, K]``) with
    lp_t = log softmax(x_t)[label_t]; the gradients of hidden and weight are computed chunk by chunk in the forward
    and scaled in the backward (``extra``: None for none, K = 0; they carry no gradient).

    Per chunk of positions (every TP rank runs the same chunks): the raw logits ``[c, V/tp]`` once; the local max,
    log-sum-exp, label logit and logits at the extra ids, all-gathered over TP ``[tp, c, 3 + K]`` into lp;
    g = d token_loss / d lp by autograd on ``[c]``; dlogits = g (onehot(label) - p) / T from the same logits;
    dhidden += dlogits @ W and dW += dlogits^T @ hidden. The loss's value and its gradient both come from the chunk
    alone, so ``token_loss`` may use only the positions of ``part``."""

    @staticmethod
    def forward(ctx, token_loss, parts, shard, temperature, need_grad, labels, extra, hidden, weight):
        source = LinearChunks(shard, hidden, weight)
        if need_grad:
            source.begin_backward()
        n, v, device = source.n, shard.valid, source.device
        ids = labels.unsqueeze(-1) if extra is None else torch.cat([labels.unsqueeze(-1), extra], -1)
        local, mine = owned(ids, shard)
        lp = torch.empty(n, device=device)
        at = torch.empty(n, ids.shape[1] - 1, device=device)
        total = torch.zeros((), device=device)
        width = max((p.stop - p.start for p in parts), default=0)
        work = torch.empty(width, v, device=device)
        for part in parts:
            c = part.stop - part.start
            stats = torch.zeros(c, 2 + ids.shape[1], device=device)
            stats[:, 0] = float("-inf")  # a rank holding only padding: m = -inf, log s = 0, no label
            if v:
                rows = source.rows(part, work[:c])  # raw logits [c, valid]
                stats[:, 2:] = torch.where(mine[part], rows.gather(1, local[part]), 0.0)
                stats[:, 2] /= temperature
                stats[:, 0], stats[:, 1], _, e = chunk_stats(rows, temperature, rows)  # e = exp(x - m_r) in place
            gathered = all_gather_rows(stats, shard)  # [tp, c, 3 + K]
            big_m, norm, _ = merge_shards(gathered[..., 0], gathered[..., 1], None)
            at_ids = gathered[..., 2:].sum(0)  # one owner per id: the others add 0
            lp[part] = (at_ids[:, 0] - big_m) - norm
            at[part] = at_ids[:, 1:]
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
            e.scatter_add_(1, local[part, :1], torch.where(mine[part, :1], g.unsqueeze(-1), 0.0))
            source.add_chunk_grad(part, e)
        ctx.mark_non_differentiable(lp, at)
        if need_grad:
            ctx.save_for_backward(*source.float_grads())
        ctx.dtypes, ctx.consumed = (hidden.dtype, weight.dtype), False
        return total, lp, at

    @staticmethod
    @once_differentiable
    def backward(ctx, g_total, g_lp, g_at):
        """Scales the forward's float32 gradients in place (no second [V/tp, h] buffer): it runs once per forward."""
        if ctx.consumed:
            raise RuntimeError("LMHead.token_loss: backward through the same forward twice (retain_graph) is "
                               "not supported; its gradients were scaled in place by the first")
        ctx.consumed = True
        g_hidden, g_weight = ctx.saved_tensors
        return (None,) * 7 + (g_hidden.mul_(g_total).to(ctx.dtypes[0]), g_weight.mul_(g_total).to(ctx.dtypes[1]))
