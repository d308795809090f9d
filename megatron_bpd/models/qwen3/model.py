"""``build_model``: this rank's Megatron-Core GPTModel of a Hugging Face Qwen3 config for the current parallel state."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...parallel.cpu_shim import tensor_cuda_is_noop_on_cpu
from .config import Qwen3Arch, transformer_config


@dataclass(frozen=True)
class Qwen3Info:
    """What the weight mapping needs to know about a built model (attached to it as ``model.qwen3``)."""

    arch: Qwen3Arch
    te: bool  # Transformer Engine layer spec (its fused-norm parameter names)
    padded_vocab_size: int


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def build_model(
    hf_config: "str | Path | dict",
    *,
    parallel_output: bool = True,
    vocab_divisible_by: int = 128,
    transformer_impl: "str | None" = None,
    **overrides: Any,
):
    """This rank's ``GPTModel`` of a dense Qwen3 for the current Megatron parallel state (TP, PP).

    hf_config: a model folder, a ``config.json`` path or its dict. transformer_impl: "local" or
    "transformer_engine" (default: Transformer Engine where it is installed). overrides: ``TransformerConfig``
    fields (e.g. ``params_dtype``, ``bf16``, ``perform_initialization``). The vocab is padded to
    ``Qwen3Arch.padded_vocab_size``; logits have shape [b, s, padded_vocab / tp] with ``parallel_output``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("Megatron parallel state is not initialized: call megatron_bpd.parallel.initialize first")
    arch = Qwen3Arch.from_hf(hf_config)
    impl = transformer_impl or ("transformer_engine" if have_transformer_engine() else "local")
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl={impl!r}: expected 'local' or 'transformer_engine'")
    te = impl == "transformer_engine"
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(arch, tp, pp, **overrides)
    if te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    padded_vocab = arch.padded_vocab_size(tp, vocab_divisible_by)
    with tensor_cuda_is_noop_on_cpu():
        model = GPTModel(
            config, spec, vocab_size=padded_vocab, max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            parallel_output=parallel_output, share_embeddings_and_output_weights=arch.tied_embeddings,
            position_embedding_type="rope", rotary_base=arch.rope_theta,
        )
    model.qwen3 = Qwen3Info(arch, te, padded_vocab)
    return model


def unwrap(model) -> torch.nn.Module:
    """The GPTModel made by ``build_model`` inside wrappers (DDP, Float16Module: ``.module``)."""
    while not hasattr(model, "qwen3"):
        if not hasattr(model, "module"):
            raise TypeError(f"{type(model).__name__} is not a Qwen3 GPTModel made by megatron_bpd build_model")
        model = model.module
    return model


def global_parameters(model) -> "dict[str, torch.nn.Parameter]":
    """This rank's parameters named with global layer indices (``decoder.layers.{global}.…``), as in the mapping."""
    model = unwrap(model)
    params = {}
    for name, param in model.named_parameters():
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers."):].split(".", 1)
            name = f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
        params[name] = param
    return params
