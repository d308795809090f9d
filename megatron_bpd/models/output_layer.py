"""The final hidden states and the output-layer weight of a Megatron-Core GPTModel, for a fused loss head.

``final_hidden_states(model)`` is a context manager: within it, the last pipeline stage's forward returns the
hidden states after the final norm, ``[b, s, h]``, instead of the logits ``[b, s, V/tp]``; the output layer's
matmul is skipped and the weight it would have used (its own, or with tied embeddings the word-embedding shard
``shared_embedding_or_output_weight()`` that GPTModel passes it) is recorded in ``head.weight``, ``[V/tp, h]``.

How: GPTModel._postprocess calls ``self.output_layer(hidden, weight=output_weight, runtime_gather_output=...)``
and, without labels, returns its first output transposed to [b, s, ...] (megatron-core 0.16.1 and 0.19.2 alike);
the output layer's forward is replaced, for the duration of the block, by a pass-through of its input. With
sequence parallelism the pass-through all-gathers the sequence as the output layer does; its backward only splits
the gradient, because the fused head's hidden gradient is already summed over the TP group.
"""

from contextlib import contextmanager
from typing import Optional

import torch

from .qwen3 import unwrap


class OutputHead:
    """Filled by the forward inside ``final_hidden_states``: ``weight`` ``[V/tp, h]`` of the output layer."""

    weight: Optional[torch.Tensor] = None


@contextmanager
def final_hidden_states(model):
    """Make ``model`` (a GPTModel from ``build_model``, possibly wrapped) return final hidden states; yields an
    ``OutputHead``. On a stage without the output layer the model is unchanged and ``head.weight`` stays None."""
    gpt = unwrap(model)
    head = OutputHead()
    layer = getattr(gpt, "output_layer", None) if gpt.post_process else None
    if layer is None:
        yield head
        return
    if getattr(gpt.config, "use_mup", False) or getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError("final_hidden_states: the model scales its logits (MuP) or has multi-token prediction, "
                         "which use the output layer's logits; set loss.fused_head=false")

    def pass_through(hidden_states, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        head.weight = layer.weight if weight is None else weight
        if layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return hidden_states, None

    layer.forward = pass_through
    try:
        yield head
    finally:
        del layer.forward  # back to the class's forward
