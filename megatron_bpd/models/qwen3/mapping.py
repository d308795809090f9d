"""The one HF <-> Megatron-Core mapping of Qwen3 weights, used by the loader, the converter, the exporter and the
weight sync to inference servers.

``tensor_maps(arch)`` lists every Megatron parameter of the full model (global layer numbers) with the HF tensors
it is made of and a ``kind`` that says how they merge and how the result is split over tensor parallelism:

- ``replicated``: norms (incl. q/k layernorm), the same on every TP rank.
- ``row``: one HF matrix split along dim 1 (``linear_proj``, ``linear_fc2``).
- ``vocab``: embedding / output layer; rows padded with zeros to the padded vocab, then split along dim 0.
- ``qkv``: q_proj, k_proj, v_proj -> rows grouped per KV group g as [q heads of g; k_g; v_g]; a contiguous dim-0
  chunk holds ng/TP whole groups.
- ``fc1``: gate_proj, up_proj -> [gate; up]; rank i holds [gate_i; up_i].
"""

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .config import Qwen3Arch

# read(hf_name, dim, start, stop) -> the rows/columns [start, stop) along dim of an HF tensor
Reader = Callable[[str, int, int, int], torch.Tensor]


@dataclass(frozen=True)
class TensorMap:
    """One Megatron parameter (``megatron``: its name with the global layer index) and its HF sources."""

    megatron: str
    hf: tuple
    kind: str
    layer: "int | None" = None  # global layer index; None for embedding, final norm, output layer
    tied: bool = False  # output layer of a tied model: made of the HF embedding, not exported again


def tensor_maps(arch: Qwen3Arch, te: bool = False) -> "list[TensorMap]":
    """Every Megatron-Core parameter of the full model in forward order (``te``: Transformer Engine spec names)."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for n in range(arch.num_layers):
        hf, mg = f"model.layers.{n}.", f"decoder.layers.{n}."
        attn_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
        mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
        layer = [
            (attn_norm, ("input_layernorm.weight",), "replicated"),
            ("self_attention.linear_qkv.weight",
             ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
            ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "replicated"),
            ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "replicated"),
            ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "row"),
            (mlp_norm, ("post_attention_layernorm.weight",), "replicated"),
            ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
            ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "row"),
        ]
        maps += [TensorMap(mg + m, tuple(hf + h for h in hs), kind, layer=n) for m, hs, kind in layer]
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if arch.tied_embeddings:
        maps.append(TensorMap("output_layer.weight", ("model.embed_tokens.weight",), "vocab", tied=True))
    else:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


@functools.lru_cache(maxsize=8)
def hf_shapes(arch: Qwen3Arch) -> "dict[str, tuple]":
    """Shape of every tensor an HF checkpoint of ``arch`` holds (tied models have no ``lm_head.weight``); shared,
    do not modify."""
    h, hd, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tied_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for n in range(arch.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (arch.num_heads * hd, h),
            p + "self_attn.k_proj.weight": (arch.num_kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (arch.num_kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, arch.num_heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })
    return shapes


def shard_shape(tm: TensorMap, arch: Qwen3Arch, tp: int, padded_vocab: int) -> tuple:
    """Shape of one TP rank's shard of ``tm``: vocab [Vp/tp, h]; qkv [(nh + 2 ng) hd / tp, h]; fc1 [2 ffn / tp, h];
    row [n, m/tp]; replicated: the HF shape."""
    shape = hf_shapes(arch)[tm.hf[0]]
    rows = {"vocab": padded_vocab // tp, "fc1": 2 * shape[0] // tp,
            "qkv": (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim // tp}
    if tm.kind == "row":
        return shape[0], shape[1] // tp
    return (rows[tm.kind], shape[1]) if tm.kind in rows else shape


def megatron_shard(tm: TensorMap, arch: Qwen3Arch, read: Reader, tp_rank: int, tp: int, padded_vocab: int,
                   out: "torch.Tensor | None" = None) -> torch.Tensor:
    """This TP rank's shard of Megatron parameter ``tm`` (shape: ``shard_shape``), built from the HF tensors that
    ``read`` returns slices of, written into ``out`` (e.g. the parameter itself: no extra copy) or a new tensor."""
    if out is None:
        out = torch.empty(shard_shape(tm, arch, tp, padded_vocab), dtype=arch.dtype)
    first, shape = tm.hf[0], hf_shapes(arch)[tm.hf[0]]

    def chunk(name, dim, size):
        return read(name, dim, tp_rank * size // tp, (tp_rank + 1) * size // tp)

    if tm.kind == "replicated":
        out.copy_(read(first, 0, 0, shape[0]))
    elif tm.kind == "row":
        out.copy_(chunk(first, 1, shape[1]))
    elif tm.kind == "fc1":
        gate, up = out.chunk(2)
        gate.copy_(chunk(tm.hf[0], 0, arch.ffn_hidden_size))
        up.copy_(chunk(tm.hf[1], 0, arch.ffn_hidden_size))
    elif tm.kind == "vocab":
        rows = out.shape[0]
        start, stop = tp_rank * rows, min((tp_rank + 1) * rows, arch.vocab_size)
        if stop > start:
            out[: stop - start].copy_(read(first, 0, start, stop))
        out[max(stop - start, 0):].zero_()
    elif tm.kind == "qkv":
        groups, hd, h = arch.num_kv_heads // tp, arch.head_dim, arch.hidden_size
        q_rows = arch.num_heads // arch.num_kv_heads * hd
        grouped = out.view(groups, q_rows + 2 * hd, h)
        for name, rows, (lo, hi) in zip(tm.hf, (arch.num_heads * hd, arch.num_kv_heads * hd, arch.num_kv_heads * hd),
                                        ((0, q_rows), (q_rows, q_rows + hd), (q_rows + hd, q_rows + 2 * hd))):
            grouped[:, lo:hi].copy_(chunk(name, 0, rows).view(groups, hi - lo, h))
    else:
        raise ValueError(f"unknown tensor kind {tm.kind!r}")
    return out


def hf_tensors(tm: TensorMap, arch: Qwen3Arch, shards: "list[torch.Tensor]") -> "dict[str, torch.Tensor]":
    """Inverse of ``megatron_shard``: the full HF tensors of ``tm`` from the shards of all TP ranks, in rank order
    (vocab padding stripped, qkv and fc1 split back)."""
    if tm.kind == "replicated":
        return {tm.hf[0]: shards[0]}
    if tm.kind == "row":
        return {tm.hf[0]: torch.cat(shards, 1)}
    if tm.kind == "vocab":
        return {tm.hf[0]: torch.cat(shards, 0)[: arch.vocab_size]}
    if tm.kind == "fc1":
        gates, ups = zip(*(s.chunk(2, 0) for s in shards))
        return {tm.hf[0]: torch.cat(gates), tm.hf[1]: torch.cat(ups)}
    if tm.kind == "qkv":
        hd, h, per_group = arch.head_dim, arch.hidden_size, arch.num_heads // arch.num_kv_heads
        parts = [s.reshape(-1, per_group + 2, hd, h).split([per_group, 1, 1], 1) for s in shards]
        return {name: torch.cat([p[i].reshape(-1, h) for p in parts]) for i, name in enumerate(tm.hf)}
    raise ValueError(f"unknown tensor kind {tm.kind!r}")
