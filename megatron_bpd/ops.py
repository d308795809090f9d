"""The segment ops behind the blockwise policy-drift gate: the C++/CUDA extension ``megatron_bpd._C`` and its
pure-PyTorch reference (the documented source of truth; the extension must match it).

Inputs: flat log-probs ``cur``/``old`` [n] (float32, bfloat16 or float16; other or mixed dtypes are cast to float32),
a bool ``mask`` [n] (True = valid position) and int64 ``seg_start``/``seg_end`` [P]: sorted, non-overlapping
segments [seg_start[s], seg_end[s]) within [0, n). Positions outside every segment are ungated: gate 1, and they
enter no statistic and no normalization. Per segment s, over its valid positions t, with d_t = cur_t - old_t
(computed only where the mask is true, so NaN/inf at masked positions are ignored):

    sum_s = sum_t f(d_t),  f = identity (signed_mean), |.| (abs_mean), square (rms);   count_s = #valid
    D_s   = sum_s / max(1, count_s)                  (sqrt of that for rms)
    g_s   = exp(-tau |D_s|) (exp)  or  1[|D_s| <= threshold] (hard)
    normalize: g_s *= C / sum_s g_s count_s, C = sum_s count_s (factor 1 when C or the denominator is 0),
               so the gates average 1 over the valid positions.

``first_bad`` is a 0-d int64 tensor: the smallest valid covered position where cur or old is non-finite, else -1
(no host sync; ``raise_if_bad`` turns it into a ValueError). Outputs are float32 and never require grad.

Backend: ``set_backend("auto" | "extension" | "reference")``; until it is called, the environment variable
MEGATRON_BPD_BACKEND (same values) is read at each call, default "auto": the extension when it is built and has a
kernel for the tensors' device, else the reference.
"""

import os

import torch

__all__ = [
    "extension_available", "set_backend", "get_backend", "raise_if_bad",
    "segment_drift_stats", "segment_broadcast", "block_drift_gates",
    "reference_segment_drift_stats", "reference_segment_broadcast", "reference_block_drift_gates",
    "segment_positions", "segment_statistic", "raw_gate", "normalization_scale",
]

STATISTICS = {"signed_mean": 0, "abs_mean": 1, "rms": 2}
GATE_FNS = {"exp": 0, "hard": 1}
BACKENDS = ("auto", "extension", "reference")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NO_BAD = torch.iinfo(torch.int64).max

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.megatron_bpd)

    _EXTENSION = hasattr(torch.ops.megatron_bpd, "block_drift_gates")
except ImportError:
    _EXTENSION = False

_backend = None  # set by set_backend; None: MEGATRON_BPD_BACKEND or "auto"


def extension_available() -> bool:
    """True when ``megatron_bpd._C`` imported and registered its ops."""
    return _EXTENSION


def set_backend(name: str) -> None:
    """Select the backend for all later calls ("auto", "extension" or "reference"); overrides the env var."""
    global _backend
    _backend = _check_backend(name, "set_backend")


def get_backend() -> str:
    """The backend in force: set_backend's choice, else MEGATRON_BPD_BACKEND, else "auto"."""
    if _backend is not None:
        return _backend
    return _check_backend(os.environ.get("MEGATRON_BPD_BACKEND", "auto"), "MEGATRON_BPD_BACKEND")


def _check_backend(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}, expected one of {BACKENDS}")
    return name


def _has_kernel(device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU"
    return _EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("megatron_bpd::block_drift_gates", key)


def _use_extension(device: torch.device) -> bool:
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "extension" and not _has_kernel(device):
        why = "is not built" if not _EXTENSION else f"has no {device.type} kernel"
        raise RuntimeError(f"megatron_bpd backend 'extension' requested but the extension megatron_bpd._C {why}; "
                           "rebuild it (pip install -e .) or use set_backend('reference')")
    return _has_kernel(device)


def raise_if_bad(first_bad: torch.Tensor, what: str = "the log-probs") -> None:
    """Raise ValueError when ``first_bad`` (from the ops) names a position (host sync)."""
    t = int(first_bad)
    if t >= 0:
        raise ValueError(f"non-finite log-prob at valid position {t} of {what}: mask that position or fix the "
                         "log-probs")


def _code(table, name, kind):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}, expected one of {tuple(table)}")
    return table[name]


def _logprobs(cur, old):
    """Detached log-probs in a dtype the kernels take (float32 when the dtypes differ or are not supported)."""
    cur, old = cur.detach(), old.detach()
    if cur.dtype != old.dtype or cur.dtype not in _KERNEL_DTYPES:
        cur, old = cur.float(), old.float()
    return cur, old


# ---------------------------------------------------------------------------------------------------------------
# Dispatching wrappers
# ---------------------------------------------------------------------------------------------------------------

def segment_drift_stats(cur, old, mask, seg_start, seg_end, statistic="signed_mean"):
    """Per-segment (sum_s [P] f32, count_s [P] f32, first_bad [] int64) of f(cur - old) over valid positions."""
    code = _code(STATISTICS, statistic, "statistic")
    cur, old = _logprobs(cur, old)
    if _use_extension(cur.device):
        return torch.ops.megatron_bpd.segment_drift_stats(cur, old, mask, seg_start, seg_end, code)
    return reference_segment_drift_stats(cur, old, mask, seg_start, seg_end, statistic)


def segment_broadcast(seg_value, seg_start, seg_end, n):
    """[n] f32: position t in segment s gets seg_value[s], uncovered positions 1."""
    seg_value = seg_value.detach().float()
    if _use_extension(seg_value.device):
        return torch.ops.megatron_bpd.segment_broadcast(seg_value, seg_start, seg_end, n)
    return reference_segment_broadcast(seg_value, seg_start, seg_end, n)


def block_drift_gates(cur, old, mask, seg_start, seg_end, statistic="signed_mean", gate_fn="exp", tau=1.0,
                      threshold=0.0, normalize=True):
    """Fused gate: (gates [n], D_s [P], count_s [P], normalized g_s [P], first_bad []); see the module doc."""
    stat_code = _code(STATISTICS, statistic, "statistic")
    gate_code = _code(GATE_FNS, gate_fn, "gate_fn")
    cur, old = _logprobs(cur, old)
    if _use_extension(cur.device):
        return torch.ops.megatron_bpd.block_drift_gates(cur, old, mask, seg_start, seg_end, stat_code, gate_code,
                                                        float(tau), float(threshold), bool(normalize))
    return reference_block_drift_gates(cur, old, mask, seg_start, seg_end, statistic, gate_fn, tau, threshold,
                                       normalize)


# ---------------------------------------------------------------------------------------------------------------
# Reference (pure PyTorch, vectorized)
# ---------------------------------------------------------------------------------------------------------------

def segment_positions(seg_start, seg_end):
    """(positions covered by the segments, in order; the segment of each), both int64 [sum of lengths]."""
    lengths = seg_end - seg_start
    seg_id = torch.repeat_interleave(torch.arange(seg_start.numel(), device=seg_start.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(seg_id.numel(), device=seg_start.device) - offsets[seg_id] + seg_start[seg_id]
    return pos, seg_id


_TERMS = {"signed_mean": lambda d: d, "abs_mean": torch.abs, "rms": torch.square}


@torch.no_grad()
def reference_segment_drift_stats(cur, old, mask, seg_start, seg_end, statistic="signed_mean"):
    """Reference of ``segment_drift_stats``: sum_s = sum_t m_t f(d_t) and count_s = sum_t m_t by index_add_."""
    _code(STATISTICS, statistic, "statistic")
    pos, seg_id = segment_positions(seg_start, seg_end)
    c, o, valid = cur[pos].float(), old[pos].float(), mask[pos]
    terms = _TERMS[statistic](torch.where(valid, c - o, 0.0))
    num_segments = seg_start.numel()
    seg_sum = torch.zeros(num_segments, device=cur.device).index_add_(0, seg_id, terms)
    seg_count = torch.zeros(num_segments, device=cur.device).index_add_(0, seg_id, valid.float())
    bad = valid & ~(torch.isfinite(c) & torch.isfinite(o))
    candidates = torch.cat([torch.where(bad, pos, _NO_BAD), pos.new_full((1,), _NO_BAD)])
    first = candidates.min()
    return seg_sum, seg_count, torch.where(first == _NO_BAD, -1, first)


@torch.no_grad()
def reference_segment_broadcast(seg_value, seg_start, seg_end, n):
    """Reference of ``segment_broadcast``: ones(n) with seg_value[s] copied onto segment s."""
    pos, seg_id = segment_positions(seg_start, seg_end)
    return torch.ones(n, device=seg_value.device).index_copy_(0, pos, seg_value.float()[seg_id])


def segment_statistic(seg_sum, seg_count, statistic="signed_mean"):
    """D_s [P] float32 from the reductions: sum_s / max(1, count_s) (its sqrt for rms), as the kernels' header."""
    mean = seg_sum.float() / seg_count.float().clamp(min=1)
    return mean.sqrt() if _code(STATISTICS, statistic, "statistic") == STATISTICS["rms"] else mean


def raw_gate(seg_stat, gate_fn="exp", tau=1.0, threshold=0.0):
    """g_s [P] float32 from D_s: exp(-tau |D_s|) or 1[|D_s| <= threshold], as the kernels' header."""
    drift = seg_stat.abs()
    return torch.exp(-tau * drift) if _code(GATE_FNS, gate_fn, "gate_fn") == 0 else (drift <= threshold).float()


def normalization_scale(total_count, weighted_count):
    """C / W, elementwise, or 1 where C or W is 0: the factor that makes gates average 1 (float32)."""
    total, weighted = torch.as_tensor(total_count).double(), torch.as_tensor(weighted_count).double()
    degenerate = (total == 0) | (weighted == 0)
    return torch.where(degenerate, 1.0, total / torch.where(degenerate, 1.0, weighted)).float()


@torch.no_grad()
def reference_block_drift_gates(cur, old, mask, seg_start, seg_end, statistic="signed_mean", gate_fn="exp", tau=1.0,
                                threshold=0.0, normalize=True):
    """Reference of ``block_drift_gates``: stats, D_s, g_s, normalization (in float64), broadcast."""
    seg_sum, seg_count, first_bad = reference_segment_drift_stats(cur, old, mask, seg_start, seg_end, statistic)
    seg_stat = segment_statistic(seg_sum, seg_count, statistic)
    seg_gate = raw_gate(seg_stat, gate_fn, tau, threshold)
    if normalize:
        seg_gate = seg_gate * normalization_scale(seg_count.double().sum(), (seg_gate.double() * seg_count).sum())
    gates = reference_segment_broadcast(seg_gate, seg_start, seg_end, cur.numel())
    return gates, seg_stat, seg_count, seg_gate, first_bad


# ---------------------------------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes depend only on input shapes, so torch.compile / FakeTensor work
# ---------------------------------------------------------------------------------------------------------------

if _EXTENSION:

    @torch.library.register_fake("megatron_bpd::segment_drift_stats")
    def _segment_drift_stats_fake(cur, old, mask, seg_start, seg_end, statistic):
        num_segments = seg_start.shape[0]
        return (cur.new_empty(num_segments, dtype=torch.float32), cur.new_empty(num_segments, dtype=torch.float32),
                cur.new_empty((), dtype=torch.int64))

    @torch.library.register_fake("megatron_bpd::segment_broadcast")
    def _segment_broadcast_fake(seg_value, seg_start, seg_end, n):
        return seg_value.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("megatron_bpd::block_drift_gates")
    def _block_drift_gates_fake(cur, old, mask, seg_start, seg_end, statistic, gate_fn, tau, threshold, normalize):
        num_segments = seg_start.shape[0]
        seg = [cur.new_empty(num_segments, dtype=torch.float32) for _ in range(3)]
        return (cur.new_empty(cur.shape[0], dtype=torch.float32), *seg, cur.new_empty((), dtype=torch.int64))
