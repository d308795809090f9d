"""Batched, KV-cached forward of an HF Qwen3ForCausalLM, driving the HF weights directly.

The cache is a fixed set of slots: per layer keys and values of shape [S, H_kv, C, D] (S slots, capacity C) and the
number of valid positions ``lengths`` [S] of each slot. A forward over rows ``slots`` [B] appends S_new tokens per
row: row b's token s sits at position ``lengths[slot_b] + s``, is written there in place and attends to positions
0..lengths[slot_b] + s of its slot. Rows may be right-padded (``new_lens[b] < S_new``): padded positions are
written past the row's length and overwritten by its next tokens. Freeing a slot copies nothing (its length is
reset when it is reused); the capacity C grows by doubling when a row outgrows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb


class KVCache:
    """``keys`` / ``values``: per layer [S, H_kv, C, D]; ``lengths`` [S] int64."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = 128):
        blank = lambda: torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype)  # noqa: E731
        self.keys = [blank() for _ in range(num_layers)]
        self.values = [blank() for _ in range(num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, capacity: int) -> None:
        """Grow every layer to at least ``capacity`` positions (doubling, to amortize the copies)."""
        if capacity <= self.capacity:
            return
        grow = max(capacity, 2 * self.capacity) - self.capacity
        self.keys = [F.pad(k, (0, 0, 0, grow)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, grow)) for v in self.values]

    def fork(self, src: int, dst: list[int]) -> None:
        """Give slots ``dst`` the cache of slot ``src`` (the n samples of one prompt share its prefill)."""
        if not dst:
            return
        used, index = int(self.lengths[src]), torch.tensor(dst)
        for layer in self.keys + self.values:
            layer[index, :, :used] = layer[src, :, :used]
        self.lengths[index] = used

    def window(self, layer: int, slots: list[int], used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H_kv, used, D] of rows ``slots``: views when the slots are consecutive, else copies."""
        k, v = self.keys[layer][:, :, :used], self.values[layer][:, :, :used]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return k[slots[0] : slots[0] + len(slots)], v[slots[0] : slots[0] + len(slots)]
        index = torch.tensor(slots)
        return k.index_select(0, index), v.index_select(0, index)


class Qwen3Runner:
    """Runs an HF ``Qwen3ForCausalLM`` (full attention layers) over a KVCache."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            raise ValueError("the embedded server supports full-attention Qwen3 layers only (no sliding window)")
        self.model = model.eval()
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self._cos = self._sin = torch.zeros(0)

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, slots, self.config.num_key_value_heads, self.head_dim,
                       self.dtype)

    def _rotary(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D] at ``positions`` [B, S], from a table of positions 0..C-1 grown by doubling."""
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 256)
            probe = torch.zeros(1, dtype=self.dtype)
            cos, sin = self.model.model.rotary_emb(probe, torch.arange(size)[None])
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions], self._sin[positions]

    @torch.inference_mode()
    def forward(self, cache: KVCache, slots: list[int], tokens: torch.Tensor, new_lens: torch.Tensor,
                at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Append ``tokens`` [B, S] (row b has ``new_lens[b]`` real tokens) to slots ``slots`` of ``cache``; return
        float32 logits [N, V] at the (row, token) pairs ``at`` ([N] each; default: each row's last real token,
        N = B). When every row's slot is empty (a prefill) the rows attend only to their own new tokens."""
        inner, config = self.model.model, self.config
        b, s = tokens.shape
        index = torch.tensor(slots)
        start = cache.lengths[index]
        fresh = not bool(start.any())
        positions = start[:, None] + torch.arange(s)  # [B, S]
        used = int(start.max()) + s
        cache.reserve(used)
        cos, sin = self._rotary(positions, used)
        mask = None if fresh else (torch.arange(used) <= positions[:, :, None])[:, None]  # [B, 1, S, used]
        heads, capacity = config.num_key_value_heads, cache.capacity  # flat row of (slot, head, position) in [S*H*C, D]
        rows = ((index[:, None, None] * heads + torch.arange(heads)[:, None]) * capacity + positions[:, None]).view(-1)
        x = inner.embed_tokens(tokens)
        shape = (b, s, -1, self.head_dim)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = _rms(layer.input_layernorm, x)
            q = _rms(attn.q_norm, _linear(attn.q_proj, h).view(shape)).transpose(1, 2)
            k = _rms(attn.k_norm, _linear(attn.k_proj, h).view(shape)).transpose(1, 2)
            v = _linear(attn.v_proj, h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.keys[i].view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            cache.values[i].view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            if not fresh:
                k, v = cache.window(i, slots, used)
            if s == 1 and not fresh:
                o = _decode_attention(q, k, v, mask, attn.scaling)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=fresh and s > 1,
                                                   scale=attn.scaling, enable_gqa=True)
            x = x + _linear(attn.o_proj, o.transpose(1, 2).reshape(b, s, -1))
            h = _rms(layer.post_attention_layernorm, x)
            x = x + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
        cache.lengths.index_add_(0, index, new_lens)
        x = x[at] if at is not None else x[torch.arange(b), new_lens - 1]
        return _linear(self.model.lm_head, _rms(inner.norm, x)).float()


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Qwen3RMSNorm in one op: x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """One query per row: softmax(q k^T * scale, masked) v with the G = H / H_kv query heads of a KV head as the
    rows of one matmul. q [B, H, 1, D], k / v [B, H_kv, L, D], mask [B, 1, 1, L] (True: attend) -> [B, H, 1, D]."""
    b, h, _, d = q.shape
    qg = q.view(b, k.shape[1], h // k.shape[1], d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(b, h, 1, d)
