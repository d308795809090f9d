"""Wrap a model for training the way Megatron-Core does: its DDP (gradient buffers, DP x CP reduction),
``finalize_model_grads`` (tied-embedding and qk-layernorm gradient sums across stages and TP ranks) and its
optimizer (optionally the distributed optimizer that shards optimizer state over DP); bf16 models in Megatron's
Float16Module (``mixed_precision``)."""

import torch

from .config import OptimizerSettings


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


def lr_scheduler(optimizer, settings: OptimizerSettings, total_updates: int, done_updates: int = 0):
    """Megatron's ``OptimizerParamScheduler`` for ``total_updates`` optimizer updates, advanced past the
    ``done_updates`` of a resumed run. Call ``.step(1)`` after every optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if settings.lr_warmup_steps >= max(total_updates, 1):
        raise ValueError(f"optimizer.lr_warmup_steps={settings.lr_warmup_steps} must be fewer than the run's "
                         f"{total_updates} optimizer updates")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if settings.lr_warmup_steps else settings.lr, max_lr=settings.lr,
        min_lr=settings.min_lr if settings.lr_decay_style != "constant" else settings.lr,
        lr_warmup_steps=settings.lr_warmup_steps, lr_decay_steps=max(total_updates, 1),
        lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
        wd_incr_steps=max(total_updates, 1), wd_incr_style="constant")
    scheduler.step(done_updates)
    return scheduler


def config_dtype_is_half(config) -> bool:
    return bool(config.bf16 or config.fp16)


def zero_grads(ddp_model, optimizer) -> None:
    """Clear the DDP gradient buffers and the optimizer's gradients before a new optimizer step."""
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def mixed_precision(model):
    """bf16 models run inside Megatron's Float16Module (bf16 activations, float32 logits on the last stage)."""
    if not model.config.bf16:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)
