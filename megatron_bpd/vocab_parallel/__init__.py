"""Vocab-parallel ops over the tensor-parallel group, never gathering the full vocabulary.

``LMHead`` (``head``): this rank's LM head output, as vocab-sharded logits ``[..., V/tp]`` or as final hidden states
``[..., h]`` with the output layer's weight shard ``[V/tp, h]`` (the logits never held), and its ops: log-probs at
ids, entropy, top-K, logits at ids, the LSM loss and a per-position token loss with its gradient taken in the
forward. Both forms run the one set of chunked max / log-sum-exp / entropy / top-K reductions in ``core``, over a
chunk source (``core.LogitsChunks``, ``fused.LinearChunks``).
"""

from .core import CHUNK_ELEMENTS
from .head import LMHead

__all__ = ["CHUNK_ELEMENTS", "LMHead"]
