"""Batched, KV-cached forward of an HF Qwen3ForCausalLM, driving the HF modules directly.

The cache holds, per layer, keys and values of shape [B, H_kv, C, D] (C = capacity) and the number of valid
positions ``lengths`` [B] of each row. A forward appends S new tokens per row: row b's token s sits at position
``lengths[b] + s`` and attends to keys 0..lengths[b] + s. Rows may be right-padded (``new_lens[b] < S``): padded
positions are written past the row's length and overwritten by its next tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer [B, H_kv, C, D]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [B] int64

    @classmethod
    def empty(cls, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> "KVCache":
        blank = lambda: torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype)  # noqa: E731
        return cls([blank() for _ in range(num_layers)], [blank() for _ in range(num_layers)],
                   torch.zeros(batch, dtype=torch.int64))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def reserve(self, capacity: int) -> None:
        """Grow every layer to at least ``capacity`` positions (doubling, to amortize copies)."""
        have = self.keys[0].shape[2]
        if capacity <= have:
            return
        grow = max(capacity, 2 * have) - have
        self.keys = [F.pad(k, (0, 0, 0, grow)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, grow)) for v in self.values]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of rows ``rows`` (repeats allowed: n samples share one prefill), trimmed to their length."""
        used = int(self.lengths[rows].max()) if rows.numel() else 0
        return KVCache([k[rows, :, :used] for k in self.keys], [v[rows, :, :used] for v in self.values],
                       self.lengths[rows].clone())

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        cap = max(c.keys[0].shape[2] for c in caches)
        pad = lambda t: F.pad(t, (0, 0, 0, cap - t.shape[2]))  # noqa: E731
        layers = range(len(caches[0].keys))
        return KVCache([torch.cat([pad(c.keys[i]) for c in caches]) for i in layers],
                       [torch.cat([pad(c.values[i]) for c in caches]) for i in layers],
                       torch.cat([c.lengths for c in caches]))


class Qwen3Runner:
    """Runs an HF ``Qwen3ForCausalLM`` (full attention layers) with a KVCache."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            raise ValueError("the embedded server supports full-attention Qwen3 layers only (no sliding window)")
        self.model = model.eval()
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = next(model.parameters()).dtype

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.empty(self.config.num_hidden_layers, batch, self.config.num_key_value_heads, self.head_dim,
                             self.dtype)

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens: torch.Tensor, new_lens: torch.Tensor, all_logits: bool = False):
        """Append ``tokens`` [B, S] (row b has ``new_lens[b]`` real tokens) to ``cache``; return float32 logits
        [B, S, V] when ``all_logits`` else the logits at each row's last real token [B, V]."""
        inner = self.model.model
        b, s = tokens.shape
        positions = cache.lengths[:, None] + torch.arange(s)  # [B, S]
        cache.reserve(int(positions.max()) + 1)
        used = int((cache.lengths + s).max())
        mask = (torch.arange(used)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, S, used]
        x = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(x, positions)
        index = positions[:, None, :, None].expand(b, self.config.num_key_value_heads, s, self.head_dim)
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (b, s, -1, self.head_dim)
            q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.keys[i].scatter_(2, index, k)
            cache.values[i].scatter_(2, index, v)
            o = F.scaled_dot_product_attention(q, cache.keys[i][:, :, :used], cache.values[i][:, :, :used],
                                               attn_mask=mask, scale=attn.scaling, enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, s, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.lengths = cache.lengths + new_lens
        if not all_logits:
            x = x[torch.arange(b), new_lens - 1]
        return self.model.lm_head(inner.norm(x)).float()
