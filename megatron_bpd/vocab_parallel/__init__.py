"""Vocab-parallel ops over the tensor-parallel group, never gathering the full vocabulary.

``logits``: ops on Megatron's vocab-sharded logits ``[..., V/tp]`` (``logprobs_at``, ``entropy``, ``gather_at``,
``topk``, ``topk_lsm_loss_parallel``). ``fused``: the same ops fused with the output layer, from hidden states
``[..., h]`` and this rank's weight shard ``[V/tp, h]``, never holding the logits (``fused_linear_*``;
``fused_linear_token_loss`` computes a per-position loss's gradient in the forward). Both run
the one set of chunked max / log-sum-exp / entropy / top-K reductions in ``core``.
"""

from .core import CHUNK_ELEMENTS
from .fused import (fused_linear_entropy, fused_linear_gather_at, fused_linear_logprobs, fused_linear_lsm_loss,
                    fused_linear_token_loss, fused_linear_topk)
from .logits import entropy, gather_at, logprobs_at, topk, topk_lsm_loss_parallel

__all__ = ["CHUNK_ELEMENTS", "entropy", "gather_at", "logprobs_at", "topk", "topk_lsm_loss_parallel",
           "fused_linear_entropy", "fused_linear_gather_at", "fused_linear_logprobs", "fused_linear_lsm_loss",
           "fused_linear_token_loss", "fused_linear_topk"]
