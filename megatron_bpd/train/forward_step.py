"""The forward step that plugs the gated OPD loss into Megatron-Core's pipeline schedules.

    forward_backward = megatron.core.pipeline_parallel.get_forward_backward_func()
    forward_backward(forward_step_func=make_forward_step(loss_config, num_tokens, num_microbatches),
                     data_iterator=iter(micro_batches), model=model, num_microbatches=num_microbatches, ...)

Every stage runs the model on its micro-batch; on the last pipeline stage the model returns vocab-parallel logits
``[b, s, V/tp]`` (``parallel_output=True``) and the loss function computes log-probs, gates and the loss from them
without gathering the vocabulary. With ``LossConfig.fused_head`` the last stage returns the final hidden states
instead (``models.output_layer.final_hidden_states``) and the loss runs the output layer fused with the log-probs,
never holding the logits. Other stages only pass activations.
"""

import functools

import torch
from megatron.core import parallel_state

from ..models.output_layer import final_hidden_states
from .batch import MicroBatch
from .loss import HiddenStates, LossConfig, opd_loss


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

    def loss_func(batch: MicroBatch, weight, output: torch.Tensor):
        head = output if weight is None else HiddenStates(output, weight)
        loss, metrics = opd_loss(head, batch, config, num_tokens,
                                 tp_group=parallel_state.get_tensor_model_parallel_group(),
                                 cp_group=parallel_state.get_context_parallel_group(), normalizer=normalizer,
                                 m2_cutoff=m2_cutoff)
        return loss * scale, {"loss": loss.detach(), **metrics}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if not config.fused_head:
            logits = model(batch.tokens, batch.position_ids, attention_mask=None)
            return logits, functools.partial(loss_func, batch, None)
        with final_hidden_states(model) as head:
            hidden = model(batch.tokens, batch.position_ids, attention_mask=None)
        return hidden, functools.partial(loss_func, batch, head.weight)

    return forward_step
