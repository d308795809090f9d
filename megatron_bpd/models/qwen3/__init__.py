"""Qwen3 dense models (0.6B-32B) on Megatron-Core: config, model builder, the HF <-> Megatron weight mapping and
checkpoint conversion.

- ``build_model(hf_config, **overrides)``: this rank's GPTModel for the current parallel state.
- ``load_hf_weights(model, hf_dir)``: fill this rank's shards from HF safetensors.
- ``iter_hf_weights(model)``: (HF name, full tensor) gathered over TP/PP (export, weight sync).
- ``convert_hf_to_megatron`` / ``export_megatron_to_hf``: the tools' library functions.
"""

from .checkpoint import (
    build_from_checkpoint,
    check_hf_checkpoint,
    convert_hf_to_megatron,
    export_megatron_to_hf,
    iter_hf_weights,
    load_hf_weights,
    load_megatron_checkpoint,
    run_parallel,
    save_hf_checkpoint,
    save_megatron_checkpoint,
)
from .config import SIZES, Qwen3Arch, qwen3_hf_config, read_hf_config, transformer_config
from .mapping import TensorMap, hf_shapes, hf_tensors, megatron_shard, shard_shape, tensor_maps
from .model import Qwen3Info, build_model, global_parameters, unwrap

__all__ = [
    "SIZES", "Qwen3Arch", "Qwen3Info", "TensorMap", "build_from_checkpoint", "build_model", "check_hf_checkpoint",
    "convert_hf_to_megatron", "export_megatron_to_hf", "global_parameters", "hf_shapes", "hf_tensors",
    "iter_hf_weights", "load_hf_weights", "load_megatron_checkpoint", "megatron_shard", "qwen3_hf_config",
    "read_hf_config", "run_parallel", "save_hf_checkpoint", "save_megatron_checkpoint", "shard_shape", "tensor_maps",
    "transformer_config", "unwrap",
]
