"""Wrap a model for training the way Megatron-Core does: its DDP (gradient buffers, DP x CP reduction),
``finalize_model_grads`` (tied-embedding and qk-layernorm gradient sums across stages and TP ranks) and its
optimizer (optionally the distributed optimizer that shards optimizer state over DP)."""

from dataclasses import dataclass

import torch


@dataclass
class OptimizerSettings:
    """The optimizer's settings (``megatron.core.optimizer.OptimizerConfig`` fields of the same names)."""

    optimizer: str = "adam"
    lr: float = 2e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


def wrap_for_training(model, settings: OptimizerSettings):
    """``(ddp_model, optimizer)`` for a model built for the current parallel state.

    The model's TransformerConfig gets ``finalize_model_grads_func`` and ``no_sync_func`` so that Megatron's
    ``get_forward_backward_func()`` reduces gradients exactly as in Megatron training (float32 gradient buffers).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if (settings.use_distributed_optimizer or config_dtype_is_half(model.config)) and not torch.cuda.is_available():
        raise ValueError("Megatron's distributed and mixed-precision optimizers take CUDA tensors only: use "
                         "optimizer.use_distributed_optimizer=false and fp32 on CPU")
    config = model.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=settings.use_distributed_optimizer)
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp_model.no_sync
    optimizer_config = OptimizerConfig(
        optimizer=settings.optimizer, lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        sgd_momentum=settings.sgd_momentum, clip_grad=settings.clip_grad,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        params_dtype=config.params_dtype, bf16=config.bf16, fp16=config.fp16)
    optimizer = get_megatron_optimizer(optimizer_config, [ddp_model])
    return ddp_model, optimizer


def config_dtype_is_half(config) -> bool:
    return bool(config.bf16 or config.fp16)


def zero_grads(ddp_model, optimizer) -> None:
    """Clear the DDP gradient buffers and the optimizer's gradients before a new optimizer step."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
