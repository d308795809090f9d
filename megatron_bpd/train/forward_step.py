"""The forward step that plugs the gated OPD loss into Megatron-Core's pipeline schedules, and the LM head that it
and every no-grad pass build from the model's output.

    forward_backward = megatron.core.pipeline_parallel.get_forward_backward_func()
    forward_backward(forward_step_func=make_forward_step(loss_config, num_tokens, num_microbatches),
                     data_iterator=iter(micro_batches), model=model, num_microbatches=num_microbatches, ...)

Every stage runs the model on its micro-batch (``head_forward``); on the last pipeline stage the output becomes a
``vocab_parallel.LMHead``: with ``LossConfig.fused_head`` the model returns its final hidden states
(``models.output_layer.final_hidden_states``) and the head holds them with the output layer's weight shard, so
the logits are never held; without it the model returns vocab-parallel logits ``[b, s, V/tp]``
(``parallel_output=True``). The loss function computes log-probs, gates and the loss from the head without
gathering the vocabulary. Other stages only pass activations.
"""

import functools
from typing import Callable, Tuple

import torch
from megatron.core import parallel_state

from ..models.output_layer import final_hidden_states
from ..vocab_parallel import LMHead
from .batch import MicroBatch
from .loss import LossConfig, opd_loss


def head_forward(model, batch: MicroBatch, config: LossConfig) -> Tuple[torch.Tensor, Callable[[torch.Tensor], LMHead]]:
    """Run ``model`` (a pipeline stage) on the micro-batch: ``(output, head_of)``. ``output`` is what the stage
    returns to the schedule: on the last stage the final hidden states ``[b, s, h]`` (``config.fused_head``) or the
    logits ``[b, s, V/tp]``, elsewhere activations; ``head_of(output)`` -> the last stage's ``LMHead`` over the
    tensor-parallel group (``config``'s vocab_size and chunk_tokens). The one place the fused choice is made."""
    kw = dict(tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=config.vocab_size,
              chunk_tokens=config.chunk_tokens)
    if not config.fused_head:
        output = model(batch.tokens, batch.position_ids, attention_mask=None)
        return output, lambda logits: LMHead.of_logits(logits, **kw)
    with final_hidden_states(model) as out:
        output = model(batch.tokens, batch.position_ids, attention_mask=None)
    return output, lambda hidden: LMHead.of_hidden(hidden, out.weight, **kw)


def gradient_scale(num_microbatches: int) -> float:
    """Factor that turns Megatron's reduction into the whole batch's gradient.

    For a 2-tuple loss Megatron divides by the number of micro-batches and multiplies by the CP size, and its DDP
    averages gradients over the DP x CP ranks. The OPD loss of a micro-batch is already divided by the global
    valid-token count, so it is scaled by num_microbatches * DP to make the gradients sum exactly.
    """
    return float(num_microbatches * parallel_state.get_data_parallel_world_size())


def make_forward_step(config: LossConfig, num_tokens: torch.Tensor, num_microbatches: int, normalizer=None,
                      m2_cutoff=None):
    """``forward_step_func(data_iterator, model)`` for ``get_forward_backward_func()``.

    The iterator yields ``MicroBatch`` objects already split for this CP rank. ``num_tokens``: valid tokens of the
    whole optimizer-step batch (all micro-batches, DP and CP ranks); ``normalizer`` and ``m2_cutoff`` the gate's and the
    drift control's statistics of that batch (``opd_loss``). The loss function returns the scaled loss
    and ``{"loss": unscaled loss, ...metrics}``; summing "loss" over micro-batches and DP ranks gives the batch loss.
    """
    scale = gradient_scale(num_microbatches)

    def loss_func(batch: MicroBatch, head_of, output: torch.Tensor):
        loss, metrics = opd_loss(head_of(output), batch, config, num_tokens,
                                 cp_group=parallel_state.get_context_parallel_group(), normalizer=normalizer,
                                 m2_cutoff=m2_cutoff)
        return loss * scale, {"loss": loss.detach(), **metrics}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output, head_of = head_forward(model, batch, config)
        return output, functools.partial(loss_func, batch, head_of)

    return forward_step
