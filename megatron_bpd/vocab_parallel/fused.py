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
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..losses import topk_lsm_loss
from .core import CHUNK_ELEMENTS, Shard, VocabStats, check_temperature, flat_ids, shard_of, topk_from_chunks
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

    def grads(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.shard.world > 1:
            dist.all_reduce(self.g_hidden, group=self.shard.group)
        return self.g_hidden.to(self.hidden.dtype), self.g_weight.to(self.weight.dtype)


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
