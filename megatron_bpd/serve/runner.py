"""Batched, KV-cached forward of an HF Qwen3ForCausalLM, driving the HF weights directly.

The cache is a fixed set of slots: per layer keys and values of shape [S, H_kv, C, D] (S slots, capacity C) and the
number of valid positions ``lengths`` [S] of each slot. A forward over rows ``slots`` [B] appends S_new tokens per
row: row b's token s sits at position ``lengths[slot_b] + s``, is written there in place and attends to positions
0..lengths[slot_b] + s of its slot. Rows may be right-padded (``new_lens[b] < S_new``): padded positions are
written past the row's length and overwritten by its next tokens. Freeing a slot copies nothing (its length is
reset when it is reused); the capacity C grows by doubling when a row outgrows it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


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

    @torch.inference_mode()  # the layers are inference tensors once a forward has grown them
    def fork(self, src: int, dst: list[int]) -> None:
        """Give slots ``dst`` the cache of slot ``src`` (the n samples of one prompt share its prefill)."""
        if not dst:
            return
        used, index = int(self.lengths[src]), torch.tensor(dst)
        for layer in self.keys + self.values:
            layer[index, :, :used] = layer[src, :, :used].clone()
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
        self._layers = [_layer_tensors(layer) for layer in model.model.layers]
        self._cos = self._sin = torch.zeros(0)

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, slots, self.config.num_key_value_heads, self.head_dim,
                       self.dtype)

    def _rotary(self, positions: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [B, 1, S, D] at ``positions`` [B, S] (see ``_rope``), from a table of positions
        0..C-1 grown by doubling."""
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 256)
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=self.dtype), torch.arange(size)[None])
            half = sin.shape[-1] // 2
            self._cos, self._sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return self._cos[positions][:, None], self._sin[positions][:, None]

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
        for i, w in enumerate(self._layers):
            h = _rms(w.input_norm, x)
            q = _rope(_rms(w.q_norm, F.linear(h, *w.q).view(shape)).transpose(1, 2), cos, sin)
            k = _rope(_rms(w.k_norm, F.linear(h, *w.k).view(shape)).transpose(1, 2), cos, sin)
            v = F.linear(h, *w.v).view(shape).transpose(1, 2)
            cache.keys[i].view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            cache.values[i].view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            if not fresh:
                k, v = cache.window(i, slots, used)
            if s == 1 and not fresh:
                o = _decode_attention(q, k, v, mask, w.scaling)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=fresh and s > 1,
                                                   scale=w.scaling, enable_gqa=True)
            x = x + F.linear(o.transpose(1, 2).reshape(b, s, -1), *w.o)
            h = _rms(w.post_norm, x)
            x = x + F.linear(w.act(F.linear(h, *w.gate)) * F.linear(h, *w.up), *w.down)
        cache.lengths.index_add_(0, index, new_lens)
        x = x[at] if at is not None else x[torch.arange(b), new_lens - 1]
        head = self.model.lm_head
        return F.linear(_rms((inner.norm.weight, inner.norm.variance_epsilon), x), head.weight, head.bias).float()


def _layer_tensors(layer: torch.nn.Module) -> SimpleNamespace:
    """A decoder layer's parameters, looked up once: (weight, bias) per projection, (weight, eps) per RMSNorm. They
    are the model's own tensors, so in-place weight updates reach the runner."""
    attn, mlp = layer.self_attn, layer.mlp
    linear = lambda m: (m.weight, m.bias)  # noqa: E731
    norm = lambda m: (m.weight, m.variance_epsilon)  # noqa: E731
    return SimpleNamespace(input_norm=norm(layer.input_layernorm), post_norm=norm(layer.post_attention_layernorm),
                           q_norm=norm(attn.q_norm), k_norm=norm(attn.k_norm), q=linear(attn.q_proj),
                           k=linear(attn.k_proj), v=linear(attn.v_proj), o=linear(attn.o_proj), scaling=attn.scaling,
                           gate=linear(mlp.gate_proj), up=linear(mlp.up_proj), down=linear(mlp.down_proj),
                           act=mlp.act_fn)


def _rms(norm: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
    """HF's Qwen3RMSNorm: x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    weight, eps = norm
    return F.rms_norm(x, weight.shape, weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], written as
    x * cos + [x2, x1] * [-sin1, sin2] (the same products). x [B, H, S, D], cos / signed_sin [B, 1, S, D]."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """One query per row: softmax(q k^T * scale, masked) v with the G = H / H_kv query heads of a KV head as the
    rows of one matmul. q [B, H, 1, D], k / v [B, H_kv, L, D], mask [B, 1, 1, L] (True: attend) -> [B, H, 1, D]."""
    b, h, _, d = q.shape
    qg = q.view(b, k.shape[1], h // k.shape[1], d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).view(b, h, 1, d)
