"""Hugging Face Qwen3 ``config.json`` -> ``Qwen3Arch`` (the numbers that decide shapes) -> Megatron-Core
``TransformerConfig``; the table of the released dense sizes."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Released dense Qwen3 sizes: (layers, hidden, heads, ffn, tied embeddings). Every size has 8 KV groups,
# head_dim 128, vocab 151936, rope theta 1e6, RMSNorm eps 1e-6, 40960 positions.
SIZES = {
    "0.6B": (28, 1024, 16, 3072, True),
    "1.7B": (28, 2048, 16, 6144, True),
    "4B": (36, 2560, 32, 9728, True),
    "8B": (36, 4096, 32, 12288, False),
    "14B": (40, 5120, 40, 17408, False),
    "32B": (64, 5120, 64, 25600, False),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def qwen3_hf_config(size: str, **fields: Any) -> dict:
    """The HF ``config.json`` dict of a released dense Qwen3 size (``fields`` override entries)."""
    if size not in SIZES:
        raise ValueError(f"unknown Qwen3 size {size!r}; known: {', '.join(SIZES)}")
    layers, hidden, heads, ffn, tied = SIZES[size]
    cfg = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=hidden,
        intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
        head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=tied,
        attention_bias=False, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16",
    )
    cfg.update(fields)
    return cfg


def read_hf_config(hf_config: "str | Path | dict") -> dict:
    """A config dict from a dict, a ``config.json`` path or a model folder holding one."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {path}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Qwen3Arch:
    """The shape-deciding numbers of a dense Qwen3 model, read from its HF config (kept verbatim in ``hf``)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    dtype: torch.dtype
    hf: dict = field(repr=False, compare=False, hash=False)

    @classmethod
    def from_hf(cls, hf_config: "str | Path | dict") -> "Qwen3Arch":
        """Parse and validate; raises ValueError naming the field for anything that is not a dense Qwen3."""
        cfg = read_hf_config(hf_config)
        archs, model_type = cfg.get("architectures") or [], cfg.get("model_type")
        if model_type != "qwen3" or any(a != "Qwen3ForCausalLM" for a in archs):
            raise ValueError(
                f"not a dense Qwen3 model: architectures={archs}, model_type={model_type!r} "
                "(expected Qwen3ForCausalLM / 'qwen3')")
        # rope theta: transformers 5.x keeps it in rope_parameters, 4.x at the top level (and rope_scaling).
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"unsupported rope scaling {rope} (only the default rotary embedding is implemented)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 1000000.0))
        if cfg.get("attention_bias"):
            raise ValueError("attention_bias=True is not a Qwen3 checkpoint this converter supports")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg['hidden_act']!r}: Qwen3 uses silu")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        if dtype_name not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r}; expected one of {list(_DTYPES)}")
        return cls(
            num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], num_heads=heads,
            num_kv_heads=kv_heads, head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            dtype=_DTYPES[dtype_name], hf=cfg,
        )

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Vocab rounded up to a multiple of lcm(divisible_by, tp): the same for every power-of-two TP <= 128, so a
        checkpoint saved at one TP loads at another (Megatron-LM's divisible_by * tp rule would change it)."""
        step = math.lcm(divisible_by, tp)
        return -(-self.vocab_size // step) * step

    def check_layout(self, tp: int, pp: int) -> None:
        """Raise ValueError when this model cannot be split ``tp`` x ``pp`` ways."""
        problems = []
        if self.num_kv_heads % tp:
            problems.append(f"TP={tp} does not divide the {self.num_kv_heads} KV groups (num_key_value_heads)")
        if self.ffn_hidden_size % tp:
            problems.append(f"TP={tp} does not divide intermediate_size={self.ffn_hidden_size}")
        if self.num_layers % pp:
            problems.append(f"PP={pp} does not divide num_hidden_layers={self.num_layers}")
        if problems:
            raise ValueError("invalid parallel layout for this Qwen3 model: " + "; ".join(problems))


def transformer_config(arch: Qwen3Arch, tp: int = 1, pp: int = 1, **overrides: Any):
    """Megatron-Core ``TransformerConfig`` of ``arch`` at ``tp`` x ``pp`` (``overrides``: any of its fields)."""
    from megatron.core.transformer import TransformerConfig

    arch.check_layout(tp, pp)
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        params_dtype=torch.float32, use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    kwargs.setdefault("pipeline_dtype", kwargs["params_dtype"])
    return TransformerConfig(**kwargs)
