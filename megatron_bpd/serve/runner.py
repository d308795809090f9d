"""Batched, KV-cached forward of an HF Qwen3ForCausalLM, driving the HF weights directly.

The cache is a fixed set of slots: per layer keys and values of shape [S, H_kv, C, D] (S slots, capacity C) and the
number of valid positions ``lengths`` [S] of each slot. ``forward`` (prefill) fills slots ``slots`` [B] with up to
S_new tokens each (right-padded rows: padded positions are written past the row's length and overwritten by its next
tokens). ``decode`` appends one token to each of slots 0..B-1 (the engine keeps its running sequences there): row
b's token sits at position ``lengths[b]``, is written there in place and attends to positions 0..lengths[b] of its
slot, read as a view of the cache. A slot is freed by forgetting it (its length is set when it is reused); the
capacity C grows by doubling when a row outgrows it.

A layer's q / k / v projections, and its gate / up projections, run as one matmul each: their weights are
concatenated once, and the HF modules' weights become views of the concatenation, so in-place weight updates (the
``/update_weights_*`` endpoints copy into the parameters) reach it. ``Qwen3Runner(model, compile=True)`` runs the
decode step through ``torch.compile``, compiled once at construction: B and the context length are dynamic, so the
one compilation serves every step but those of a single row, which run eagerly (torch.compile specializes size 1).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


class KVCache:
    """``keys`` / ``values``: per layer [S, H_kv, C, D]; ``lengths`` [S] int64 (inference tensors)."""

    @torch.inference_mode()
    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 capacity: int = 128):
        blank = lambda: torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype)  # noqa: E731
        self.keys = [blank() for _ in range(num_layers)]
        self.values = [blank() for _ in range(num_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.int64)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @torch.inference_mode()
    def reserve(self, capacity: int) -> None:
        """Grow every layer to at least ``capacity`` positions (doubling, to amortize the copies)."""
        if capacity <= self.capacity:
            return
        grow = max(capacity, 2 * self.capacity) - self.capacity
        self.keys = [F.pad(k, (0, 0, 0, grow)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, grow)) for v in self.values]

    @torch.inference_mode()
    def copy(self, src: list[int], dst: list[int]) -> None:
        """Give each slot ``dst[i]`` the cache and length of slot ``src[i]`` (the n samples of a prompt share its
        prefill; a sequence moves to a lower slot). ``src`` and ``dst`` are disjoint."""
        if not dst:
            return
        src_index, dst_index = torch.tensor(src), torch.tensor(dst)
        used = int(self.lengths[src_index].max())
        for layer in self.keys + self.values:
            layer[dst_index, :, :used] = layer[src_index, :, :used]
        self.lengths[dst_index] = self.lengths[src_index]


class Qwen3Runner:
    """Runs an HF ``Qwen3ForCausalLM`` (full attention layers) over a KVCache."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        config = model.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
            raise ValueError("the embedded server supports full-attention Qwen3 layers only (no sliding window)")
        self.model = model.eval()
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self._layers = [_layer_tensors(layer) for layer in model.model.layers]
        self._cos = self._sin = torch.zeros(0)
        self._compiled = torch.compile(self._decode_step) if compile else None
        if compile:  # compile now, not at the first request: a decode step of 2 rows on a scratch cache, with
            # tokens made outside inference mode as the engine's are (an inference tensor would compile again);
            # after a reset, since torch.compile would make the sizes of another model in this process dynamic
            torch._dynamo.reset()
            scratch = self.new_cache(2)
            with torch.inference_mode():
                scratch.lengths += 1
            self.decode(scratch, torch.zeros(2, dtype=torch.int64))

    def new_cache(self, slots: int) -> KVCache:
        return KVCache(self.config.num_hidden_layers, slots, self.config.num_key_value_heads, self.head_dim,
                       self.dtype)

    def _rotary(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables [P, D] (P >= ``needed`` positions, see ``_rope``), grown by doubling."""
        if needed > self._cos.shape[0]:
            size = max(needed, 2 * self._cos.shape[0], 256)
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=self.dtype), torch.arange(size)[None])
            half = sin.shape[-1] // 2
            self._cos, self._sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return self._cos, self._sin

    @torch.inference_mode()
    def forward(self, cache: KVCache, slots: list[int], tokens: torch.Tensor, new_lens: torch.Tensor,
                at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Prefill: fill slots ``slots`` of ``cache`` with ``tokens`` [B, S] (row b has ``new_lens[b]`` real tokens,
        causal attention among them; whatever the slots held is dropped); return float32 logits [N, V] at the
        (row, token) pairs ``at`` ([N] each; default: each row's last real token, N = B)."""
        inner, config = self.model.model, self.config
        b, s = tokens.shape
        index = torch.tensor(slots)
        cos, sin = (t[:s] for t in self._rotary(s))  # [S, D]
        cache.reserve(s)
        heads, capacity = config.num_key_value_heads, cache.capacity  # flat row of (slot, head, position) in [S*H*C, D]
        rows = ((index[:, None, None] * heads + torch.arange(heads)[:, None]) * capacity + torch.arange(s)).view(-1)
        x = inner.embed_tokens(tokens)
        for i, w in enumerate(self._layers):
            q, k, v = _qkv(w, x, (b, s, -1, self.head_dim), cos, sin)
            cache.keys[i].view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
            cache.values[i].view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, scale=w.scaling, enable_gqa=True)
            x = _mlp(w, x + F.linear(o.transpose(1, 2).reshape(b, s, -1), *w.o))
        cache.lengths[index] = new_lens
        return self._logits(x[at] if at is not None else x[torch.arange(b), new_lens - 1])

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B] to slots 0..B-1 of ``cache`` (one each); return float32 next-token logits [B, V]."""
        b = tokens.shape[0]
        positions = cache.lengths[:b]
        used = int(positions.max()) + 1
        cache.reserve(used + 1)  # a spare position: a window [:used] is never a whole (contiguous) layer, which
        # torch.compile would specialize for
        window = lambda layers: [layer[:b, :, :used] for layer in layers]  # noqa: E731 - views [B, H_kv, used, D]
        keys, values, (cos, sin) = window(cache.keys), window(cache.values), self._rotary(used)
        if self._compiled is not None and b > 1:  # B, used and the table length vary, the other sizes are fixed
            for t, dims in [(t, (0, 2)) for t in keys + values] + [(cos, 0), (sin, 0), (tokens, 0), (positions, 0)]:
                torch._dynamo.mark_dynamic(t, dims)
            logits = self._compiled(keys, values, cos, sin, tokens, positions)
        else:
            logits = self._decode_step(keys, values, cos, sin, tokens, positions)
        cache.lengths[:b] += 1
        return logits

    def _decode_step(self, keys: list[torch.Tensor], values: list[torch.Tensor], cos: torch.Tensor,
                     sin: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step proper (what ``compile`` compiles): keys / values per layer [B, H_kv, L, D] (written in
        place at ``positions`` [B] < L), rotary tables cos / sin [P, D], tokens [B] -> float32 logits [B, V]."""
        b, length = tokens.shape[0], keys[0].shape[2]
        cos, sin = cos[positions][:, None, None], sin[positions][:, None, None]  # [B, 1, 1, D]
        mask = (torch.arange(length) <= positions[:, None])[:, None, None]  # [B, 1, 1, L]
        at = (torch.arange(b)[:, None], torch.arange(keys[0].shape[1]), positions[:, None])  # (row, head, position)
        x = self.model.model.embed_tokens.weight[tokens][:, None]  # [B, 1, hidden]
        for i, w in enumerate(self._layers):
            q, k, v = _qkv(w, x, (b, 1, -1, self.head_dim), cos, sin)
            keys[i].index_put_(at, k[:, :, 0])
            values[i].index_put_(at, v[:, :, 0])
            o = _decode_attention(q, keys[i], values[i], mask, w.scaling)
            x = _mlp(w, x + F.linear(o.reshape(b, 1, -1), *w.o))
        return self._logits(x[:, 0])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output layer: hidden states [N, hidden] -> float32 logits [N, V]."""
        inner, head = self.model.model, self.model.lm_head
        return F.linear(_rms((inner.norm.weight, inner.norm.variance_epsilon), x), head.weight, head.bias).float()


def _layer_tensors(layer: torch.nn.Module) -> SimpleNamespace:
    """A decoder layer's parameters, looked up once: (weight, bias) per projection, q / k / v and gate / up fused
    (``_fuse``), (weight, eps) per RMSNorm. They are (or are views of) the model's own tensors, so in-place weight
    updates reach the runner."""
    attn, mlp = layer.self_attn, layer.mlp
    norm = lambda m: (m.weight, m.variance_epsilon)  # noqa: E731
    return SimpleNamespace(input_norm=norm(layer.input_layernorm), post_norm=norm(layer.post_attention_layernorm),
                           q_norm=norm(attn.q_norm), k_norm=norm(attn.k_norm), scaling=attn.scaling,
                           qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                           qkv_split=[attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features],
                           o=(attn.o_proj.weight, attn.o_proj.bias), gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
                           down=(mlp.down_proj.weight, mlp.down_proj.bias), act=mlp.act_fn)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    """(weight [sum of out_features, in], bias or None): the linears' weights (and biases) concatenated, as
    parameters (static shapes for torch.compile); each linear's own weight and bias become views of them. A model
    serves one runner at a time: a second runner fuses again, and the first no longer sees weight updates."""
    fused = []
    for name in ("weight", "bias"):
        if getattr(linears[0], name) is None:
            fused.append(None)
            continue
        whole = torch.nn.Parameter(torch.cat([getattr(m, name).detach() for m in linears]), requires_grad=False)
        begin = 0
        for m in linears:
            part = getattr(m, name)
            part.data = whole.data[begin : begin + part.shape[0]]
            begin += part.shape[0]
        fused.append(whole)
    return tuple(fused)


def _qkv(w: SimpleNamespace, x: torch.Tensor, shape: tuple[int, ...], cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, S, D] and k, v [B, H_kv, S, D] of hidden states x [B, S, hidden] (input norm, the fused
    projection, q / k norms, rotary embedding with cos / signed sin broadcastable to [B, 1, S, D])."""
    q, k, v = F.linear(_rms(w.input_norm, x), *w.qkv).split(w.qkv_split, dim=-1)
    q = _rope(_rms(w.q_norm, q.view(shape)).transpose(1, 2), cos, sin)
    k = _rope(_rms(w.k_norm, k.view(shape)).transpose(1, 2), cos, sin)
    return q, k, v.view(shape).transpose(1, 2)


def _mlp(w: SimpleNamespace, x: torch.Tensor) -> torch.Tensor:
    """x + down(act(gate(h)) * up(h)), h = the post-attention norm of x [..., hidden]."""
    gate, up = F.linear(_rms(w.post_norm, x), *w.gate_up).chunk(2, dim=-1)
    return x + F.linear(w.act(gate) * up, *w.down)


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
