"""Blockwise policy-drift gates (method.md, "The gate").

Per response position t of a sampled path, with loss mask m_t:
    d_t   = lp_cur_t - lp_old_t                                   (signed drift, student only)
    D_s   = sum_{t in s} m_t f(d_t) / max(1, sum_{t in s} m_t)    (segment statistic; f = id, |.|, or ^2 then sqrt)
    g_s   = exp(-tau |D_s|)        or   1[|D_s| <= threshold]      (raw gate, every position of s gets g_s)
    g~_t  = g_t / (sum_t m_t g_t / sum_t m_t)                     (mean-normalized over valid positions)
Segments cut each sequence's response into fixed blocks of ``block_size`` positions counted from the response
start ("block"; "token" = blocks of 1, "sequence" = the whole response), or spans that start at marked positions
("span", see ``newline_span_starts``). Positions before a sequence's response start are never gated (gate 1).
The gates are detached: they reweight per-position losses and never carry gradient.

Layer 1 of the package: tensors in, tensors out; no torch.distributed, no Megatron. The segmented reduction runs in
the C++/CUDA extension when available (``megatron_bpd.ops``), else in its PyTorch reference.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from . import ops
from .method_config import GateConfig

@dataclass
class SequenceLayout:
    """Where each sequence's response lives in the flat position array of a batch.

    ``starts``/``ends`` [num_seqs] int64: flat index of the first response position and one past the last.
    ``shape``: the caller's tensor shape, ``[b, s]`` padded or ``[n]`` packed, for error messages.
    """

    starts: torch.Tensor
    ends: torch.Tensor
    seq_offsets: torch.Tensor
    shape: tuple

    def describe(self, flat_index: int) -> str:
        """'position (sequence i, offset j)' of a flat index, in the caller's terms."""
        seq = int(torch.searchsorted(self.seq_offsets, torch.tensor(flat_index), right=True)) - 1
        offset = flat_index - int(self.seq_offsets[seq])
        if len(self.shape) == 2:
            return f"[{seq}, {offset}]"
        return f"{flat_index} (sequence {seq}, offset {offset})"


def sequence_layout(shape: Sequence[int], device, cu_seqlens=None, response_starts=None) -> SequenceLayout:
    """Layout of padded ``[b, s]`` (each row a sequence) or packed ``[n]`` inputs (THD, ``cu_seqlens``)."""
    shape = tuple(shape)
    if len(shape) == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed [n] inputs; got padded inputs of shape " f"{list(shape)}")
        b, s = shape
        seq_offsets = torch.arange(b + 1, device=device, dtype=torch.int64) * s
    elif len(shape) == 1:
        n = shape[0]
        if cu_seqlens is None:
            seq_offsets = torch.tensor([0, n], device=device, dtype=torch.int64)
        else:
            seq_offsets = cu_seqlens.to(device=device, dtype=torch.int64)
            if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or int(seq_offsets[0]) != 0 \
                    or int(seq_offsets[-1]) != n or bool((seq_offsets.diff() < 0).any()):
                raise ValueError(f"cu_seqlens must be non-decreasing from 0 to the token count {n}, "
                                 f"got {cu_seqlens.tolist()}")
    else:
        raise ValueError(f"log-probs must be padded [b, s] or packed [n], got shape {list(shape)}")
    lengths = seq_offsets.diff()
    if response_starts is None:
        rel = torch.zeros_like(lengths)
    else:
        rel = torch.as_tensor(response_starts, device=device).to(torch.int64).reshape(-1)
        if rel.numel() != lengths.numel():
            raise ValueError(f"response_starts has {rel.numel()} entries for {lengths.numel()} sequences")
        if bool(((rel < 0) | (rel > lengths)).any()):
            raise ValueError(f"response_starts {rel.tolist()} must lie within the sequence lengths "
                             f"{lengths.tolist()}")
    return SequenceLayout(seq_offsets[:-1] + rel, seq_offsets[1:], seq_offsets, shape)


def segment_bounds(layout: SequenceLayout, config: GateConfig, span_starts=None):
    """Segments of every response as flat ``(seg_start, seg_end)`` [P] int64, sorted and non-overlapping.

    Blocks: ``ceil(L_i / B)`` blocks per response of length L_i, the last one cut at the response end.
    Spans: a segment starts at each response start and at each marked position inside a response.
    Sequences with an empty response contribute no segment.
    """
    starts, ends = layout.starts, layout.ends
    lengths = (ends - starts).clamp(min=0)
    if config.granularity in ("block", "token", "sequence"):
        block = config.segment_block_size
        if block is None:  # "sequence": one block as long as the longest response
            block = max(int(lengths.max()) if lengths.numel() else 1, 1)
        counts = (lengths + block - 1) // block
        seq_of_seg = torch.repeat_interleave(torch.arange(counts.numel(), device=starts.device), counts)
        first_seg = torch.cumsum(counts, 0) - counts
        index_in_seq = torch.arange(seq_of_seg.numel(), device=starts.device) - first_seg[seq_of_seg]
        seg_start = starts[seq_of_seg] + block * index_in_seq
        return seg_start, torch.minimum(seg_start + block, ends[seq_of_seg])
    if config.granularity == "span":
        if span_starts is None:
            raise ValueError("granularity 'span' needs span_starts (see newline_span_starts)")
        marks = span_starts.reshape(-1).to(torch.bool).clone()
        if marks.numel() != int(layout.seq_offsets[-1]):
            raise ValueError(f"span_starts has shape {list(span_starts.shape)}, log-probs {list(layout.shape)}")
        n = marks.numel()
        pos = torch.arange(n, device=marks.device)
        seq_of_pos = torch.repeat_interleave(torch.arange(starts.numel(), device=marks.device),
                                             layout.seq_offsets.diff(), output_size=n)
        marks &= pos >= starts[seq_of_pos]  # prompt positions never start a segment
        nonempty = lengths > 0
        marks[starts[nonempty]] = True
        seg_start = marks.nonzero().reshape(-1)
        next_start = torch.cat([seg_start[1:], seg_start.new_tensor([n])])
        return seg_start, torch.minimum(next_start, ends[seq_of_pos[seg_start]])
    raise ValueError(f"granularity {config.granularity!r} has no segments")


@dataclass
class SegmentPlan:
    """The segments of one micro-batch, planned on its full (unsplit) sequences.

    ``segment_ids`` (the input's shape, int64): the segment of each position, -1 where ungated (prompt).
    ``sequence_of_segment`` [S]: the sequence each segment belongs to. ``longest_segment``: the most positions
    of any segment (None in the local plan of one chunk, which only gates). Under context parallelism every rank
    takes its share of ``segment_ids`` with the same split as the tokens (``megatron_bpd.parallel``).
    """

    segment_ids: torch.Tensor
    sequence_of_segment: torch.Tensor
    num_sequences: int
    longest_segment: Optional[int] = None

    @property
    def num_segments(self) -> int:
        return self.sequence_of_segment.numel()


def plan_segments(shape, config: GateConfig, *, device="cpu", cu_seqlens=None, response_starts=None,
                  span_starts=None) -> SegmentPlan:
    """Plan the segments of padded ``[b, s]`` or packed ``[n]`` sequences (granularity "none": whole responses,
    for statistics)."""
    layout = sequence_layout(shape, device, cu_seqlens, response_starts)
    planned = config if config.granularity != "none" else GateConfig(granularity="sequence")
    seg_start, seg_end = segment_bounds(layout, planned, span_starts)
    ids = torch.full((int(layout.seq_offsets[-1]),), -1, dtype=torch.int64, device=device)
    pos, seg = ops.segment_positions(seg_start, seg_end)
    ids[pos] = seg
    sequence_of_segment = torch.searchsorted(layout.seq_offsets, seg_start, right=True) - 1
    longest = int((seg_end - seg_start).max()) if seg_start.numel() else 0
    return SegmentPlan(ids.reshape(tuple(shape)), sequence_of_segment, layout.starts.numel(), longest)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Where a segment begins, bool of the shape of ``segment_ids`` (any layout flattened in order; -1 ungated
    positions count as starts): the positions at which a chunk of the positions may begin so that every segment
    lies whole in one chunk."""
    seg = segment_ids.reshape(-1)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = (seg[1:] != seg[:-1]) | (seg[1:] < 0)
    return starts.view(segment_ids.shape)


def drift_gates(cur_logprobs: torch.Tensor, old_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                config: GateConfig = GateConfig(), *, cu_seqlens=None, response_starts=None, span_starts=None,
                normalizer=None):
    """Detached, mean-normalized drift gates for every position: ``(gates, stats)``.

    cur_logprobs, old_logprobs: ``[b, s]`` padded or ``[n]`` packed with ``cu_seqlens`` ``[num_seqs + 1]``, any
    float dtype. loss_mask: same shape, bool or 0/1. Returns ``gates`` float32 of the input shape (no grad; with
    ``config.normalize`` they average 1 over the valid positions of each normalization scope) and ``stats``, a
    ``GateStats`` mapping whose 0-d summaries are computed on first read (from the inputs as they are then):
    per-segment tensors (``segment_drift`` D_s, ``segment_count``, ``segment_gate``), ``normalizer_terms`` [2]
    (valid count, raw-gate-weighted count: summed over a whole batch they are the ``normalizer`` of scope
    "global") and 0-d summary tensors for logging (``gate_mean/min/max/std`` over valid positions,
    ``drift_mean``, ``drift_abs_mean`` (token level), ``segment_drift_abs_mean``, ``frac_gate_below_half`` of the
    segments with a valid position). A NaN/inf log-prob at a valid response position raises ValueError naming it.
    """
    _check_inputs(cur_logprobs, old_logprobs, loss_mask, span_starts)
    if config.granularity == "none" or config.scope != "micro-batch" or normalizer is not None:
        plan = plan_segments(cur_logprobs.shape, config, device=cur_logprobs.device, cu_seqlens=cu_seqlens,
                             response_starts=response_starts, span_starts=span_starts)
        return gates_for_segments(cur_logprobs, old_logprobs, loss_mask, plan.segment_ids, plan, config,
                                  normalizer=normalizer)
    # One micro-batch normalized on its own: the fused kernel does reduction, gate and normalization in one op.
    layout = sequence_layout(cur_logprobs.shape, cur_logprobs.device, cu_seqlens, response_starts)
    seg_start, seg_end = segment_bounds(layout, config, span_starts)
    cur, old, mask = _flat(cur_logprobs, old_logprobs, loss_mask)
    gates, seg_stat, seg_count, seg_gate, first_bad = ops.block_drift_gates(
        cur, old, mask, seg_start, seg_end, config.statistic, config.gate_fn, config.tau, _threshold(config),
        config.normalize)
    _raise_if_bad(first_bad, layout.describe, layout.shape)
    raw = ops.raw_gate(seg_stat, config.gate_fn, config.tau, _threshold(config))
    stats = _stats(seg_stat, seg_count, seg_gate, raw, lambda: _drift_sums(cur, old, mask))
    return gates.reshape(cur_logprobs.shape), stats


def gates_for_segments(cur_logprobs, old_logprobs, loss_mask, segment_ids, plan: SegmentPlan, config: GateConfig,
                       *, reduce=None, normalizer=None):
    """Gates for this process's positions of a planned micro-batch: ``(gates, stats)`` as in ``drift_gates``.

    ``segment_ids`` are this process's entries of ``plan.segment_ids`` in the layout of ``cur_logprobs`` (all of
    them, or a context-parallel rank's share). The per-segment sums and counts are combined by ``reduce`` (an
    in-place sum of a float32 tensor over the processes that share the micro-batch's sequences, e.g. an all-reduce
    over the CP group) before the gate is taken, so every position gets the gate of its unsplit sequence.
    ``normalizer`` (scope "global"): [2] = (valid count, raw-gate-weighted count) summed over the optimizer-step
    batch, from ``stats["normalizer_terms"]`` of a pass with ``normalize=False``.
    """
    _check_inputs(cur_logprobs, old_logprobs, loss_mask)
    if segment_ids.shape != cur_logprobs.shape:
        raise ValueError(f"segment_ids has shape {list(segment_ids.shape)}, log-probs {list(cur_logprobs.shape)}")
    cur, old, mask = _flat(cur_logprobs, old_logprobs, loss_mask)
    run_start, run_end, run_id = _runs(segment_ids.reshape(-1).to(cur.device, torch.int64))
    run_sum, run_count, first_bad = ops.segment_drift_stats(cur, old, mask, run_start, run_end, config.statistic)
    num = plan.num_segments
    packet = torch.cat([
        torch.zeros(num, device=cur.device).index_add_(0, run_id, run_sum),
        torch.zeros(num, device=cur.device).index_add_(0, run_id, run_count),
        _drift_sums(cur, old, mask), (first_bad >= 0).float().reshape(1)])
    if reduce is not None:
        reduce(packet)
    seg_sum, seg_count, drift_sums, any_bad = packet[:num], packet[num:2 * num], packet[2 * num:-1], packet[-1]
    if bool(any_bad > 0):
        shape = tuple(cur_logprobs.shape)
        _raise_if_bad(first_bad, lambda t: str(list(_unravel(t, shape))) if len(shape) > 1 else str(t), shape)
        raise ValueError("non-finite log-prob at a valid position on another process of the reduction group")
    seg_stat = ops.segment_statistic(seg_sum, seg_count, config.statistic)
    raw = ops.raw_gate(seg_stat, config.gate_fn, config.tau, _threshold(config))
    if config.granularity == "none":
        raw = torch.ones_like(raw)
    seg_gate = _normalize(raw, seg_count, config, plan, normalizer)
    gates = ops.segment_broadcast(seg_gate[run_id], run_start, run_end, cur.numel())
    return gates.reshape(cur_logprobs.shape), _stats(seg_stat, seg_count, seg_gate, raw, drift_sums)


def _check_inputs(cur, old, mask, span_starts=None):
    if cur.shape != old.shape or mask.shape != cur.shape:
        raise ValueError(f"shapes differ: cur_logprobs {list(cur.shape)}, old_logprobs {list(old.shape)}, "
                         f"loss_mask {list(mask.shape)}")
    if not (cur.is_floating_point() and old.is_floating_point()):
        raise ValueError(f"log-probs must be floating point, got {cur.dtype} and {old.dtype}")
    if span_starts is not None and span_starts.shape != cur.shape:
        raise ValueError(f"span_starts has shape {list(span_starts.shape)}, log-probs {list(cur.shape)}")


def _flat(cur, old, mask):
    mask = mask.reshape(-1)
    return cur.detach().reshape(-1), old.detach().reshape(-1), mask if mask.dtype == torch.bool else mask != 0


def _threshold(config: GateConfig) -> float:
    return config.threshold if config.threshold is not None else 0.0


def _unravel(index: int, shape) -> tuple:
    out = []
    for size in reversed(shape):
        index, rem = divmod(index, size)
        out.append(rem)
    return tuple(reversed(out))


def _runs(segment_ids: torch.Tensor):
    """Maximal runs of equal non-negative ids in a flat [n] array: (run_start, run_end, run_id), each [R]."""
    n = segment_ids.numel()
    change = torch.ones(n, dtype=torch.bool, device=segment_ids.device)
    change[1:] = segment_ids[1:] != segment_ids[:-1]
    bounds = change.nonzero().reshape(-1)
    ends = torch.cat([bounds[1:], bounds.new_tensor([n])])
    keep = segment_ids[bounds] >= 0
    return bounds[keep], ends[keep], segment_ids[bounds[keep]]


class ChunkGates:
    """The gates of a micro-batch taken chunk by chunk, for a loss head that reads each chunk's log-probs once (the
    fused head's token loss): ``chunk`` gives the raw gates g_s of a chunk that holds every position of its
    segments (cut at ``segment_starts``); ``finish`` normalizes them with the scope's one factor and returns what
    ``gates_for_segments`` returns on the whole micro-batch, without a second pass over it. ``segment_ids``: the
    micro-batch's ``plan.segment_ids`` (-1: ungated)."""

    def __init__(self, config: GateConfig, segment_ids: torch.Tensor):
        self.config, self.segment_ids = config, segment_ids.reshape(-1).to(torch.int64)
        self.raw = torch.ones(self.segment_ids.shape, device=self.segment_ids.device)
        self.segments = []  # each chunk's (D_s, count_s, raw g_s)

    def chunk(self, part: slice, cur_logprobs, old_logprobs, loss_mask) -> torch.Tensor:
        """Raw gates ``[c]`` (1 where ungated) of the flat positions ``part`` from their log-probs ``[c]``."""
        ids = self.segment_ids[part]
        valid = ids >= 0
        lo = ids[valid].min() if bool(valid.any()) else ids.new_zeros(())
        local = torch.where(valid, ids - lo, -1)
        num = int(local.max()) + 1 if local.numel() else 0  # segments of the chunk
        plan = SegmentPlan(local, torch.zeros(num, dtype=torch.int64), 1)
        gates, stats = gates_for_segments(cur_logprobs, old_logprobs, loss_mask, local, plan,
                                          dataclasses.replace(self.config, normalize=False))
        self.raw[part] = gates
        self.segments.append((stats["segment_drift"], stats["segment_count"], stats["segment_gate"]))
        return gates

    def finish(self, cur_logprobs, old_logprobs, loss_mask, normalizer=None):
        """``(gates, stats)`` of the whole micro-batch (``cur_logprobs`` etc. ``[b, s]``, every chunk taken): the raw
        gates times ``normalization_factor`` of the scope, as ``gates_for_segments``."""
        seg_stat, seg_count, raw = (torch.cat(t) for t in zip(*self.segments))
        factor = normalization_factor(self.config, _normalizer_terms(raw, seg_count), normalizer)
        gates = torch.where(self.segment_ids >= 0, self.raw * factor, 1.0)  # ungated positions: 1
        drift_sums = lambda: _drift_sums(*_flat(cur_logprobs, old_logprobs, loss_mask))  # noqa: E731
        return gates.view(cur_logprobs.shape), _stats(seg_stat, seg_count, raw * factor, raw, drift_sums)


def normalization_factor(config: GateConfig, terms: torch.Tensor, normalizer=None) -> torch.Tensor:
    """The one factor that turns raw gates into normalized ones for the scopes "micro-batch" (``terms``: the
    micro-batch's ``normalizer_terms``) and "global" (``normalizer``); 1 without ``normalize``. 0-d float32."""
    if not config.normalize:
        return torch.ones((), device=terms.device)
    if config.scope == "global":
        if normalizer is None:
            raise ValueError("scope 'global' needs normalizer=: the normalizer_terms of every micro-batch of the "
                             "optimizer step, summed (and all-reduced over data-parallel ranks)")
        return ops.normalization_scale(normalizer[0], normalizer[1]).to(terms.device)
    if config.scope == "micro-batch":
        return ops.normalization_scale(terms[0], terms[1])
    raise ValueError(f"scope {config.scope!r} has one normalization factor per sequence, not one per micro-batch")


def _normalize(raw, count, config: GateConfig, plan: SegmentPlan, normalizer):
    """Normalized gates [S] for the configured scope (see GateConfig.scope)."""
    if config.normalize and config.scope == "sequence":
        group = plan.sequence_of_segment.to(raw.device)
        total = torch.zeros(plan.num_sequences, device=raw.device, dtype=torch.float64)
        weighted = torch.zeros_like(total)
        total.index_add_(0, group, count.double())
        weighted.index_add_(0, group, (raw * count).double())
        return raw * ops.normalization_scale(total, weighted)[group]
    return raw * normalization_factor(config, _normalizer_terms(raw, count), normalizer)


def _normalizer_terms(raw, count) -> torch.Tensor:
    """[2] float64: (valid count, raw-gate-weighted count) of segments with raw gates ``raw`` and ``count``."""
    return torch.stack([count.double().sum(), (raw.double() * count).sum()])


def _raise_if_bad(first_bad: torch.Tensor, describe, shape) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise ValueError(f"non-finite log-prob at valid position {describe(bad)} of the log-probs of shape "
                         f"{list(shape)}: mask that position or fix the log-probs")


def _drift_sums(cur, old, mask) -> torch.Tensor:
    """[3] float32: (sum of d_t, sum of |d_t|, count) over valid positions, for the token-level summaries."""
    drift = torch.where(mask, cur.float() - old.float(), 0.0)
    return torch.stack([drift.sum(), drift.abs().sum(), mask.sum().float()])


def _with_sentinel(values, keep, fill):
    """values where keep, else fill, plus one trailing fill: safe to reduce when empty."""
    return torch.cat([torch.where(keep, values, fill), values.new_full((1,), fill)])


SUMMARIES = ("gate_mean", "gate_std", "gate_min", "gate_max", "drift_mean", "drift_abs_mean",
             "segment_drift_abs_mean", "frac_gate_below_half")


class GateStats(Mapping):
    """The ``stats`` of ``drift_gates``: per-segment tensors and ``normalizer_terms`` at once, the 0-d logging
    ``SUMMARIES`` computed together on first access (a caller that only wants the gates skips their passes over
    [n] and [S]). Read-only mapping of str -> tensor."""

    def __init__(self, tensors: dict, summaries: Callable[[], dict]):
        self._values, self._summaries = dict(tensors), summaries

    def __getitem__(self, key):
        if key in SUMMARIES and self._summaries is not None:
            self._values.update(self._summaries())
            self._summaries = None
        return self._values[key]

    def __iter__(self):
        return iter([*self._values, *(SUMMARIES if self._summaries is not None else ())])

    def __len__(self):
        return len(self._values) + (len(SUMMARIES) if self._summaries is not None else 0)


def _stats(seg_stat, seg_count, seg_gate, raw_gate, drift_sums: Union[torch.Tensor, Callable]) -> GateStats:
    """Per-segment tensors and lazy 0-d summaries for logging (no host sync); see ``drift_gates``.
    ``drift_sums``: the [3] of ``_drift_sums``, or a function computing it when a summary is first read."""
    tensors = dict(segment_drift=seg_stat, segment_count=seg_count, segment_gate=seg_gate,
                   normalizer_terms=_normalizer_terms(raw_gate, seg_count))
    return GateStats(tensors, lambda: _summaries(seg_stat, seg_count, seg_gate,
                                                 drift_sums() if callable(drift_sums) else drift_sums))


@torch.no_grad()
def _summaries(seg_stat, seg_count, seg_gate, drift_sums) -> dict:
    """The 0-d ``SUMMARIES``: gate moments over valid positions, token- and segment-level drift."""
    valid = seg_count > 0
    denom = seg_count.sum().clamp(min=1)
    gate_mean = (seg_gate * seg_count).sum() / denom
    one = torch.ones((), device=seg_gate.device)
    any_valid = valid.any()
    return dict(
        gate_mean=torch.where(any_valid, gate_mean, one),
        gate_std=((seg_count * (seg_gate - gate_mean) ** 2).sum() / denom).sqrt(),
        gate_min=torch.where(any_valid, _with_sentinel(seg_gate, valid, float("inf")).amin(), one),
        gate_max=torch.where(any_valid, _with_sentinel(seg_gate, valid, float("-inf")).amax(), one),
        drift_mean=drift_sums[0] / drift_sums[2].clamp(min=1),
        drift_abs_mean=drift_sums[1] / drift_sums[2].clamp(min=1),
        segment_drift_abs_mean=(seg_stat.abs() * seg_count).sum() / denom,
        frac_gate_below_half=((seg_gate < 0.5) & valid).sum() / valid.sum().clamp(min=1),
    )


def newline_span_starts(token_ids: torch.Tensor, newline_token_ids, *, min_len: int = 8, max_len: int = 256,
                        fallback_block: int = 64, cu_seqlens=None, response_starts=None) -> torch.Tensor:
    """Mark the first position of each NewlineSpan: bool of ``token_ids``' shape (``[b, s]`` or packed ``[n]``).

    Rules (method.md): a new span starts after each token that contains a newline (``newline_token_ids``: the
    vocabulary ids whose text contains "\\n"); spans shorter than ``min_len`` are merged into the next span (the
    last span of a response merges into the previous one); spans longer than ``max_len`` are split into pieces of
    ``max_len``; a response with no newline at all is cut into fixed blocks of ``fallback_block``. Positions are
    counted from each sequence's response start; the response start itself is always a span start.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    layout = sequence_layout(token_ids.shape, token_ids.device, cu_seqlens, response_starts)
    flat = token_ids.reshape(-1)
    newline = torch.isin(flat, torch.as_tensor(list(newline_token_ids), dtype=flat.dtype, device=flat.device))
    marks = torch.zeros(flat.numel(), dtype=torch.bool)
    newline = newline.cpu()
    for start, end in zip(layout.starts.tolist(), layout.ends.tolist()):
        if end > start:
            for offset in _span_offsets(newline[start:end], min_len, max_len, fallback_block):
                marks[start + offset] = True
    return marks.to(token_ids.device).reshape(token_ids.shape)


def _span_offsets(newline: torch.Tensor, min_len: int, max_len: int, fallback_block: int) -> list:
    """Span start offsets of one response given which of its tokens contain a newline."""
    length = newline.numel()
    breaks = (newline[:-1].nonzero().reshape(-1) + 1).tolist()  # a span starts right after a newline token
    if not newline.any():
        return list(range(0, length, fallback_block))
    bounds = [0] + breaks + [length]
    spans = [[a, b] for a, b in zip(bounds[:-1], bounds[1:])]
    merged = []  # short spans merge into the next one; a short last span merges into the previous one
    for span in spans:
        if merged and merged[-1][1] - merged[-1][0] < min_len:
            merged[-1][1] = span[1]
        else:
            merged.append(span)
    if len(merged) > 1 and merged[-1][1] - merged[-1][0] < min_len:
        last = merged.pop()
        merged[-1][1] = last[1]
    return [a + k for a, b in merged for k in range(0, b - a, max_len)]
