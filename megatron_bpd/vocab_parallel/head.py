"""One LM head for every pass: this rank's output of the model's last layer, and every op taken of it, written once.

An ``LMHead`` holds n positions ``[...]`` of this tensor-parallel rank's vocabulary shard in one of two forms:

- ``LMHead.of_logits(logits)``: Megatron's output-layer logits with ``parallel_output=True``, ``[..., V/tp]``, any
  float dtype (a ``core.LogitsChunks`` source);
- ``LMHead.of_hidden(hidden, weight)``: the final hidden states ``[..., h]`` (the same on every TP rank) and the
  output layer's weight shard ``[V/tp, h]`` (its own or the tied word embeddings'); the logits x = hidden @ W^T are
  recomputed chunk by chunk in float32 and never held, nor their gradient (a ``fused.LinearChunks`` source).

Rank r holds global ids [r*V/tp, (r+1)*V/tp); ids >= ``vocab_size`` are padding, sliced off before any softmax or
top-K. All math is float32 on x / T (T > 0); logits must be finite. The ops, the same on both forms:

- ``logprobs(ids, T)``: log softmax(x / T)[ids], ids ``[...]`` or ``[..., K]``; with ``logits_at`` ``[..., K']``
  also the raw logits there, up to a per-position constant, in the same pass;
- ``entropy(T)``; ``topk(k, T)``, the exact global top-k log-probs and ids (no gradient), with ``logprobs_at``
  also log-probs at given ids in the same pass;
- ``logits_at(ids)``: raw logits at ids; ``lsm_loss(ids, teacher, mask, ...)``: ``losses.topk_lsm_loss`` on them;
- ``token_loss(labels, fn, T)``: a sum of per-position functions of the labels' log-probs with its gradient taken
  in the forward from each chunk's logits (3 output-layer GEMMs: only where ``gradient_in_forward``, the hidden
  form; on logits the same loss is ``fn`` of ``logprobs``, back-propagated).

Chunks of ``chunk_tokens`` positions (default: as many as fill 128 MiB of float32 at V/tp columns): at most one
float32 ``[chunk, V/tp]`` work buffer (two for the entropy). Communication: forward is one all-gather over TP of
``[n, 2 (+1 entropy) + K]`` float32 per rank; backward none on logits, one all-reduce of the hidden gradient
``[n, h]`` on the hidden form (as Megatron's column-parallel output layer does). Cost of the hidden form against
the output layer + the ops on logits: the forward GEMM [n, h] x [h, V/tp] runs again in the backward (4 instead of
3 GEMMs) except in ``token_loss``; memory O(chunk * V/tp + V/tp * h), independent of n. Not twice differentiable.
"""

from typing import Callable, Optional, Tuple

import torch

from ..losses import topk_lsm_loss
from .core import LogitsChunks, VocabStats, check_temperature, chunk_tokens, flat_ids, shard_of, topk_from_chunks
from .fused import LinearChunks, TokenLossInForward, chunks_at


class LMHead:
    """n positions ``[...]`` of this rank's LM head output (logits or hidden states + weight shard); see the module
    doc. ``shape``: the positions' shape; ``chunk``: positions per chunk; ``gradient_in_forward``: whether
    ``token_loss`` takes its gradient in the forward (hidden states: 3 GEMMs instead of the backward's 4)."""

    def __init__(self, source_cls, inputs: Tuple[torch.Tensor, ...], shape: torch.Size, tp_group,
                 vocab_size: Optional[int], chunk: Optional[int], what: str):
        self._cls, self._inputs, self.shape, self._what = source_cls, inputs, shape, what
        self.shard = shard_of(self._source_rows(), tp_group, vocab_size)
        self.chunk = chunk_tokens(chunk, self.shard.local_size, "chunk_tokens")
        self.gradient_in_forward = source_cls is LinearChunks

    def _source_rows(self) -> int:
        """V/tp: the columns of the logits, the rows of the weight shard."""
        return self._inputs[0].shape[-1] if self._cls is LogitsChunks else self._inputs[1].shape[0]

    @classmethod
    def of_logits(cls, logits: torch.Tensor, tp_group=None, vocab_size: Optional[int] = None,
                  chunk_tokens: Optional[int] = None) -> "LMHead":
        """The head over vocab-sharded logits ``[..., V/tp]``; ``tp_group`` None: one unsharded process."""
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
        if logits.dim() < 2:
            raise ValueError(f"logits must be [..., V/tp] with at least one token dimension, got {list(logits.shape)}")
        return cls(LogitsChunks, (logits.reshape(-1, logits.shape[-1]),), logits.shape[:-1], tp_group, vocab_size,
                   chunk_tokens, f"logits {list(logits.shape)}")

    @classmethod
    def of_hidden(cls, hidden: torch.Tensor, weight: torch.Tensor, tp_group=None, vocab_size: Optional[int] = None,
                  chunk_tokens: Optional[int] = None) -> "LMHead":
        """The head over final hidden states ``[..., h]`` and this rank's output weight shard ``[V/tp, h]``."""
        if not (hidden.is_floating_point() and weight.is_floating_point()):
            raise ValueError(f"hidden and weight must be float tensors, got {hidden.dtype} and {weight.dtype}")
        if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden [..., h] and weight [V/tp, h] do not fit: hidden {list(hidden.shape)}, "
                             f"weight {list(weight.shape)}")
        if hidden.device != weight.device:
            raise ValueError(f"hidden is on {hidden.device}, weight on {weight.device}")
        return cls(LinearChunks, (hidden.reshape(-1, hidden.shape[-1]), weight), hidden.shape[:-1], tp_group,
                   vocab_size, chunk_tokens, f"hidden {list(hidden.shape)}")

    def _ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids ``[...]`` or ``[..., K]`` -> ``[n, K]``, checked against the vocabulary (one host sync)."""
        return flat_ids(ids, self.shape, self.shard.vocab_size, self._what)

    def _stats(self, ids: Optional[torch.Tensor], temperature: float, softmax: bool, entropy: bool):
        """``core.VocabStats`` on flat ids ``[n, K]``: (L, H, x_ids), see there."""
        check_temperature(temperature)
        return VocabStats.apply(self._cls, ids, self.shard, float(temperature), self.chunk, softmax, entropy,
                                *self._inputs)

    def logprobs(self, ids: torch.Tensor, temperature: float = 1.0, logits_at: Optional[torch.Tensor] = None):
        """log softmax(x / T)[ids] over the full unpadded vocabulary: ids ``[...]`` -> ``[...]`` or ``[..., K]`` ->
        ``[..., K]`` float32. Backward, local shard only: dx_v = (sum_k g_k [v == id_k] - p_v sum_k g_k) / T.
        With ``logits_at`` ids ``[..., K']``: ``(log-probs, a)``, a ``[..., K']`` = x[logits_at] - c (no gradient;
        c a per-position constant, the shift-invariant LSM's input) from the same pass and all-gather."""
        flat = self._ids(ids)
        extra = None if logits_at is None else self._ids(logits_at)
        norm, _, x_ids = self._stats(flat if extra is None else torch.cat([flat, extra], -1), temperature, True,
                                     False)
        lp = (x_ids[:, :flat.shape[1]] - norm.unsqueeze(-1)).view(ids.shape)  # (x_i - M) - (lse - M)
        if extra is None:
            return lp
        return lp, (x_ids[:, flat.shape[1]:].detach() * temperature).view(logits_at.shape)  # x / T - M, times T

    def entropy(self, temperature: float = 1.0) -> torch.Tensor:
        """H = -sum_v p_v log p_v of p = softmax(x / T) over the unpadded vocabulary ``[...]`` float32. Backward:
        dH/dx_v = -p_v (log p_v + H) / T."""
        _, ent, _ = self._stats(None, temperature, True, True)
        return ent.view(self.shape)

    def logits_at(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw logits at global ids ``[..., K]`` (or ``[...]``) -> the same shape, float32: each id's owner computes
        it (a gather, or a dot product hidden . W_id), summed over TP; backward to the owning shard only."""
        _, _, x_ids = self._stats(self._ids(ids), 1.0, False, False)
        return x_ids.view(ids.shape)

    def topk(self, k: int, temperature: float = 1.0, logprobs_at: Optional[torch.Tensor] = None):
        """Exact global top-k of log softmax(x / T): (values ``[..., k]`` float32 log-probs, ids ``[..., k]`` int64
        global ids), sorted descending (``core.topk_from_chunks``; padding never wins). With ``logprobs_at`` ids
        ``[...]`` or ``[..., K]``: also their log-probs (as ``logprobs``) from the same pass over the vocabulary,
        as a third element. No gradient."""
        check_temperature(temperature)
        at = None if logprobs_at is None else self._ids(logprobs_at)
        out = topk_from_chunks(self._cls(self.shard, *self._inputs), k, float(temperature), self.chunk, at)
        top = out[0].view(*self.shape, k), out[1].view(*self.shape, k)
        return top if at is None else (*top, out[2].view(logprobs_at.shape))

    def lsm_loss(self, ids: torch.Tensor, teacher_logprobs: torch.Tensor, loss_mask: torch.Tensor, **loss_kwargs):
        """Teacher-TopK/LSM loss: ``logits_at(ids)`` ``[..., K]`` into ``losses.topk_lsm_loss`` (the one
        implementation of the formula; ``loss_kwargs``: gates, log_ratio_clip, support_mask, num_tokens). Returns
        ``(loss, metrics)``. On hidden states the gradient flows through the K dot products only."""
        return topk_lsm_loss(self.logits_at(ids), teacher_logprobs, loss_mask, **loss_kwargs)

    def token_loss(self, labels: torch.Tensor, token_loss: Callable[[slice, torch.Tensor], torch.Tensor],
                   temperature: float = 1.0, chunk_starts: Optional[torch.Tensor] = None,
                   logits_at: Optional[torch.Tensor] = None):
        """A loss of the labels' log-probs, summed over chunks, with its gradient computed in the forward (only
        where ``gradient_in_forward``: hidden states).

        labels ``[...]``; lp = log softmax(x / T)[labels]. ``token_loss(part, lp_part)`` -> 0-d: the loss of the
        flat positions ``part`` (a slice of ``[n]``) from their log-probs ``lp_part`` ``[c]`` float32,
        differentiable in lp_part and using no other position's log-prob. ``chunk_starts`` ``[...]`` bool: where
        a chunk may begin (None: anywhere), e.g. the starts of gate segments so that a segment's statistic lies in
        one chunk; a chunk grows past ``chunk`` only to reach the next allowed start. ``logits_at`` ``[..., K']``:
        also the raw logits there (no gradient), in the same all-gather. Returns (sum of the chunk losses 0-d
        float32, lp ``[...]`` float32 without gradient, the raw logits at ``logits_at`` or None); the loss
        back-propagates into hidden and weight exactly as ``sum token_loss(part, logprobs(labels)[part])`` does,
        with 3 GEMMs instead of 4, the logits of one chunk at a time."""
        if not self.gradient_in_forward:
            raise ValueError("token_loss takes its gradient in the forward from hidden states; on logits take "
                             "logprobs and back-propagate")
        check_temperature(temperature)
        labels_flat = self._ids(labels)[:, 0]
        if chunk_starts is not None and chunk_starts.shape != labels.shape:
            raise ValueError(f"chunk_starts has shape {list(chunk_starts.shape)}, labels {list(labels.shape)}")
        extra = None if logits_at is None else self._ids(logits_at)
        hidden, weight = self._inputs
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        total, lp, at = TokenLossInForward.apply(token_loss, chunks_at(labels_flat.shape[0], self.chunk, chunk_starts),
                                                 self.shard, float(temperature), need_grad, labels_flat, extra,
                                                 hidden, weight)
        return total, lp.view(labels.shape), None if extra is None else at.view(logits_at.shape)
