"""Ops on logits sharded over the vocabulary on the tensor-parallel group, never gathering the full vocabulary.

Input: Megatron's output-layer logits with ``parallel_output=True``, ``[b, s, V/tp]`` or packed ``[n, V/tp]``, any
float dtype; rank r holds global ids [r*V/tp, (r+1)*V/tp). The model's vocabulary may be padded (to a multiple of
TP*128): ids >= ``vocab_size`` are padding, sliced off before any softmax or top-K. All math is float32 on
x = logits / T (T > 0). Logits must be finite.

Ops: ``logprobs_at`` (log-softmax at ids), ``entropy``, ``topk`` (exact global top-K, no grad), ``gather_at`` (raw
logits at ids) and ``topk_lsm_loss_parallel`` (``gather_at`` + ``losses.topk_lsm_loss``). They run the chunked
reductions of ``core`` over a ``LogitsChunks`` source: chunks of ``chunk_size`` tokens (default: as many as fill
128 MiB of float32), at most one float32 ``[chunk, V/tp]`` work buffer (two for the entropy), backward computes
straight into the gradient for float32 logits. Not twice differentiable. Communication: forward is one all-gather
over TP of ``[n, 2 (+1 entropy) + K]`` float32 per rank (TP*(2+K)*4 bytes received per position for
``logprobs_at``); backward needs none.
"""

from typing import Optional, Tuple

import torch

from .core import LogitsChunks, VocabStats, check_temperature, chunk_tokens, flat_ids, shard_of, topk_from_chunks


def _source(logits: torch.Tensor, tp_group, temperature: float, vocab_size: Optional[int]) -> LogitsChunks:
    """Validate and flatten logits ``[..., V/tp]`` to a ``[n, V/tp]`` chunk source."""
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V/tp] with at least one token dimension, got {list(logits.shape)}")
    check_temperature(temperature)
    return LogitsChunks(shard_of(logits.shape[-1], tp_group, vocab_size), logits.reshape(-1, logits.shape[-1]))


def _vocab_stats(logits, ids, tp_group, temperature, vocab_size, chunk_size, softmax, entropy):
    """Run ``core.VocabStats`` on the flattened logits; returns (L, H, x_ids) flat."""
    source = _source(logits, tp_group, temperature, vocab_size)
    chunk = chunk_tokens(chunk_size, source.shard.local_size)
    if ids is not None:
        ids = flat_ids(ids, logits.shape[:-1], source.shard.vocab_size, f"logits {list(logits.shape)}")
    return VocabStats.apply(LogitsChunks, ids, source.shard, float(temperature), chunk, softmax, entropy,
                            source.logits)


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor, tp_group, temperature: float = 1.0,
                vocab_size: Optional[int] = None, chunk_size: Optional[int] = None) -> torch.Tensor:
    """log softmax(logits / T)[ids] over the full unpadded vocabulary: logits ``[..., V/tp]``, ids ``[...]`` ->
    ``[...]`` or ids ``[..., K]`` -> ``[..., K]`` (float32). Backward, local shard only:
    dlogits_v = (sum_k g_k [v == id_k] - p_v sum_k g_k) / T. ids outside [0, vocab_size) raise a ValueError (one
    host sync)."""
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


def topk(logits: torch.Tensor, k: int, tp_group, temperature: float = 1.0, vocab_size: Optional[int] = None,
         chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact global top-k of log softmax(logits / T) over the unpadded vocabulary: ``[..., V/tp]`` -> (values
    ``[..., k]`` float32 full-vocabulary log-probs, ids ``[..., k]`` int64 global ids), sorted descending
    (``core.topk_from_chunks``; padding never wins). No gradient: the teacher's support and its log-probs are
    targets."""
    source = _source(logits, tp_group, temperature, vocab_size)
    values, ids = topk_from_chunks(source, k, float(temperature), chunk_tokens(chunk_size, source.shard.local_size))
    out_shape = (*logits.shape[:-1], k)
    return values.view(out_shape), ids.view(out_shape)


def topk_lsm_loss_parallel(student_logits: torch.Tensor, support_ids: torch.Tensor,
                           teacher_logprobs_at_support: torch.Tensor, loss_mask: torch.Tensor, tp_group,
                           vocab_size: Optional[int] = None, **loss_kwargs):
    """Teacher-TopK/LSM loss on vocab-sharded student logits ``[..., V/tp]``: the student's logits at the teacher's
    support ``[..., K]`` via ``gather_at``, then ``losses.topk_lsm_loss`` (the one implementation of the formula;
    ``loss_kwargs``: gates, log_ratio_clip, support_mask, num_tokens). Returns ``(loss, metrics)``."""
    from ..losses import topk_lsm_loss

    student_at_support = gather_at(student_logits, support_ids, tp_group, vocab_size)
    return topk_lsm_loss(student_at_support, teacher_logprobs_at_support, loss_mask, **loss_kwargs)
