"""drift_gates against a position-by-position float64 implementation of method.md's gate."""

import math

import pytest
import torch

from megatron_bpd import ops
from megatron_bpd.gating import (GateConfig, drift_gates, gates_for_segments, newline_span_starts, plan_segments,
                                 segment_starts)


def reference_gates(cur, old, mask, config, response_starts, span_starts=None):
    """Padded [b, s] lists -> gates [b][s] straight from method.md, one sequence and one segment at a time."""
    segments = []  # (row, [positions])
    for row in range(len(cur)):
        s, start = len(cur[row]), response_starts[row]
        if config.granularity == "span":
            cuts = [p for p in range(start, s) if p == start or span_starts[row][p]]
        else:
            block = {"token": 1, "block": config.block_size, "sequence": max(s, 1)}[config.granularity]
            cuts = list(range(start, s, block))
        for i, a in enumerate(cuts):
            b = cuts[i + 1] if i + 1 < len(cuts) else s
            segments.append((row, list(range(a, b))))
    gates = [[1.0] * len(r) for r in cur]
    raw = []
    for row, positions in segments:
        valid = [p for p in positions if mask[row][p]]
        drifts = [cur[row][p] - old[row][p] for p in valid]
        if config.statistic == "signed_mean":
            stat = sum(drifts) / max(1, len(valid))
        elif config.statistic == "abs_mean":
            stat = sum(abs(d) for d in drifts) / max(1, len(valid))
        else:
            stat = math.sqrt(sum(d * d for d in drifts) / max(1, len(valid)))
        g = math.exp(-config.tau * abs(stat)) if config.gate_fn == "exp" else float(abs(stat) <= config.threshold)
        raw.append((row, positions, valid, g))
    for row, positions, _, g in raw:
        scope = [r for r in raw if config.scope != "sequence" or r[0] == row]  # rows are sequences here
        count = sum(len(v) for _, _, v, _ in scope)
        weighted = sum(len(v) * g for _, _, v, g in scope)
        scale = count / weighted if config.normalize and count > 0 and weighted > 0 else 1.0
        for p in positions:
            gates[row][p] = g * scale
    return gates


def random_batch(seed, b=4, s=37, drift=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g) * 5
    cur = old + torch.randn(b, s, generator=g) * drift
    mask = torch.rand(b, s, generator=g) < 0.85
    starts = torch.randint(0, s // 2, (b,), generator=g)
    for row, start in enumerate(starts.tolist()):
        mask[row, :start] = False
    return cur.to(dtype), old.to(dtype), mask, starts


CONFIGS = [
    GateConfig(granularity="block", block_size=8),
    GateConfig(granularity="block", block_size=64),
    GateConfig(granularity="token"),
    GateConfig(granularity="sequence"),
    GateConfig(granularity="block", block_size=5, statistic="abs_mean", tau=2.0),
    GateConfig(granularity="block", block_size=6, statistic="rms", normalize=False),
    GateConfig(granularity="block", block_size=4, gate_fn="hard", threshold=0.3),
    GateConfig(granularity="block", block_size=8, scope="sequence"),
    GateConfig(granularity="token", statistic="abs_mean", scope="sequence"),
]


@pytest.mark.parametrize("backend", ["reference", "extension"])
@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: f"{c.granularity}{c.block_size}-{c.statistic}-{c.gate_fn}-{c.scope}")
@pytest.mark.parametrize("seed", range(3))
def test_gates_match_method_formulas(backend, config, seed):
    if backend == "extension" and not ops.extension_available():
        pytest.skip("the C++ extension is not built in this environment")
    ops.set_backend(backend)
    try:
        cur, old, mask, starts = random_batch(seed)
        gates, stats = drift_gates(cur, old, mask, config, response_starts=starts)
    finally:
        ops.set_backend("auto")
    expected = reference_gates(cur.double().tolist(), old.double().tolist(), mask.tolist(), config, starts.tolist())
    torch.testing.assert_close(gates, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert gates.dtype == torch.float32 and not gates.requires_grad
    if config.normalize:
        assert gates[mask].mean().item() == pytest.approx(1.0, abs=1e-5)
    for row, start in enumerate(starts.tolist()):
        assert torch.all(gates[row, :start] == 1.0)  # prompt positions are never gated


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: c.granularity)
def test_planned_segments_equal_the_fused_kernel(config):
    """The segment-plan path (used under context parallelism) gives the fused op's gates and statistics."""
    cur, old, mask, starts = random_batch(5)
    fused, fused_stats = drift_gates(cur, old, mask, config, response_starts=starts)
    plan = plan_segments(cur.shape, config, response_starts=starts)
    planned, stats = gates_for_segments(cur, old, mask, plan.segment_ids, plan, config)
    torch.testing.assert_close(planned, fused)
    for key in ("segment_drift", "segment_count", "segment_gate", "normalizer_terms", "gate_min", "drift_abs_mean"):
        torch.testing.assert_close(stats[key], fused_stats[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=lambda c: c.granularity)
def test_plan_longest_segment_and_starts(config):
    """``longest_segment`` is the largest count of one segment id; ``segment_starts`` marks the first position of
    every segment and every ungated position, so cutting there keeps each segment whole."""
    cur, _, _, starts = random_batch(5)
    plan = plan_segments(cur.shape, config, response_starts=starts)
    ids = plan.segment_ids.reshape(-1)
    assert plan.longest_segment == int(torch.bincount(ids[ids >= 0]).max())
    marks = segment_starts(plan.segment_ids).reshape(-1)
    assert marks.shape == ids.shape and bool(marks[0])
    for t in range(1, ids.numel()):
        assert bool(marks[t]) == (int(ids[t]) < 0 or int(ids[t]) != int(ids[t - 1])), t
    first = {}
    for t, s in enumerate(ids.tolist()):
        first.setdefault(s, t)
    assert all(bool(marks[t]) for s, t in first.items() if s >= 0)


def test_global_scope_over_micro_batches_equals_one_call():
    """Scope "global": the summed normalizer terms of the micro-batches give the whole batch's gates."""
    cur, old, mask, starts = random_batch(6, b=6)
    whole, _ = drift_gates(cur, old, mask, GateConfig(block_size=8), response_starts=starts)
    config = GateConfig(block_size=8, scope="global")
    micro = [slice(0, 2), slice(2, 3), slice(3, 6)]
    raw = GateConfig(block_size=8, normalize=False)
    terms = sum(drift_gates(cur[m], old[m], mask[m], raw, response_starts=starts[m])[1]["normalizer_terms"]
                for m in micro)
    parts = [drift_gates(cur[m], old[m], mask[m], config, response_starts=starts[m], normalizer=terms)[0]
             for m in micro]
    torch.testing.assert_close(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="needs normalizer"):
        drift_gates(cur, old, mask, config)


def test_spans_match_method_formulas():
    cur, old, mask, starts = random_batch(4, s=50)
    g = torch.Generator().manual_seed(1)
    span_starts = torch.rand(cur.shape, generator=g) < 0.15
    config = GateConfig(granularity="span")
    gates, stats = drift_gates(cur, old, mask, config, response_starts=starts, span_starts=span_starts)
    expected = reference_gates(cur.double().tolist(), old.double().tolist(), mask.tolist(), config,
                               starts.tolist(), span_starts.tolist())
    torch.testing.assert_close(gates, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", CONFIGS + [GateConfig(granularity="span")],
                         ids=lambda c: f"{c.granularity}{c.block_size}-{c.statistic}-{c.gate_fn}-{c.scope}")
def test_gates_on_cuda_match_method_formulas(config, dtype):
    """Every granularity through the CUDA kernel: odd sizes, gates equal to the formulas and to the CPU kernel."""
    if not ops._has_kernel(torch.device("cuda")):
        pytest.fail("megatron_bpd._C has no CUDA kernel: rebuild it with a GPU visible")
    cur, old, mask, starts = random_batch(11, b=3, s=257, dtype=dtype)
    span_starts = torch.rand(cur.shape, generator=torch.Generator().manual_seed(2)) < 0.1
    spans = dict(span_starts=span_starts) if config.granularity == "span" else {}
    ops.set_backend("extension")
    try:
        gates, _ = drift_gates(cur.cuda(), old.cuda(), mask.cuda(), config, response_starts=starts.cuda(),
                               **{k: v.cuda() for k, v in spans.items()})
        cpu_gates, _ = drift_gates(cur, old, mask, config, response_starts=starts, **spans)
    finally:
        ops.set_backend("auto")
    assert gates.device.type == "cuda" and gates.dtype == torch.float32
    expected = reference_gates(cur.double().tolist(), old.double().tolist(), mask.tolist(), config, starts.tolist(),
                               span_starts.tolist())
    torch.testing.assert_close(gates.cpu(), torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gates.cpu(), cpu_gates, rtol=1e-5, atol=1e-6)


def test_packed_equals_padded():
    """THD packing with cu_seqlens gives the same gates as the padded layout of the same sequences."""
    cur, old, mask, starts = random_batch(7, b=3, s=30)
    lengths = [30, 17, 25]
    for row, length in enumerate(lengths):
        mask[row, length:] = False
    config = GateConfig(block_size=4)
    padded, _ = drift_gates(cur, old, mask, config, response_starts=starts)
    pack = lambda x: torch.cat([x[row, :length] for row, length in enumerate(lengths)])
    cu = torch.tensor([0, 30, 47, 72], dtype=torch.int32)
    packed, _ = drift_gates(pack(cur), pack(old), pack(mask), config, cu_seqlens=cu, response_starts=starts)
    torch.testing.assert_close(packed, pack(padded))


def test_hand_computed_block_example():
    """Two blocks of 2: drifts (0.2, 0.4) and (-1.0, masked NaN). D = 0.3 and -1.0."""
    cur = torch.tensor([[0.2, 0.4, -1.0, float("nan")]])
    old = torch.zeros(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    gates, stats = drift_gates(cur, old, mask, GateConfig(block_size=2))
    g1, g2 = math.exp(-0.3), math.exp(-1.0)
    scale = 3 / (2 * g1 + g2)
    torch.testing.assert_close(gates, torch.tensor([[g1, g1, g2, g2]]) * scale)
    torch.testing.assert_close(stats["segment_drift"], torch.tensor([0.3, -1.0]))
    torch.testing.assert_close(stats["segment_count"], torch.tensor([2.0, 1.0]))
    assert stats["drift_abs_mean"].item() == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    assert stats["frac_gate_below_half"].item() == 0.0
    assert stats["gate_mean"].item() == pytest.approx(1.0)


def test_signed_mean_cancels_abs_mean_does_not():
    cur = torch.tensor([[0.5, -0.5]])
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    signed, _ = drift_gates(cur, old, mask, GateConfig(block_size=2, normalize=False))
    absolute, _ = drift_gates(cur, old, mask, GateConfig(block_size=2, statistic="abs_mean", normalize=False))
    assert torch.allclose(signed, torch.ones(1, 2))
    assert torch.allclose(absolute, torch.full((1, 2), math.exp(-0.5)))


@pytest.mark.parametrize("case", ["all_masked", "length_one", "block_larger_than_response", "empty_response",
                                  "empty_batch", "hard_all_zero"])
def test_edge_cases_never_nan(case):
    cur, old, mask, _ = random_batch(0, b=2, s=5)
    config = GateConfig(block_size=4)
    kwargs = {}
    if case == "all_masked":
        mask[:] = False
    elif case == "length_one":
        cur, old, mask = cur[:, :1], old[:, :1], mask[:, :1]
    elif case == "block_larger_than_response":
        config = GateConfig(block_size=1000)
    elif case == "empty_response":
        kwargs["response_starts"] = torch.tensor([5, 5])
    elif case == "empty_batch":
        cur, old, mask = cur[:0], old[:0], mask[:0]
    elif case == "hard_all_zero":
        cur = old + 10.0
        config = GateConfig(block_size=2, gate_fn="hard", threshold=0.1)
    gates, stats = drift_gates(cur, old, mask, config, **kwargs)
    assert gates.shape == cur.shape
    assert torch.isfinite(gates).all()
    assert all(torch.isfinite(v).all() for v in stats.values())
    if case in ("all_masked", "empty_response"):
        assert torch.all(gates == 1.0)


def test_none_granularity_is_all_ones_with_stats():
    cur, old, mask, _ = random_batch(1)
    gates, stats = drift_gates(cur, old, mask, GateConfig(granularity="none"))
    assert torch.all(gates == 1.0)
    assert stats["drift_abs_mean"].item() > 0


def test_nan_at_valid_position_is_named_and_masked_nan_ignored():
    cur, old, mask, _ = random_batch(2, b=2, s=6)
    mask[1, 3] = False
    cur[1, 3] = float("nan")
    old[0, 0] = float("-inf")
    mask[0, 0] = False
    drift_gates(cur, old, mask, GateConfig(block_size=2))
    mask[1, 3] = True
    with pytest.raises(ValueError, match=r"non-finite log-prob at valid position \[1, 3\]"):
        drift_gates(cur, old, mask, GateConfig(block_size=2))
    packed_mask = mask.reshape(-1)
    with pytest.raises(ValueError, match=r"position 9 \(sequence 1, offset 3\)"):
        drift_gates(cur.reshape(-1), old.reshape(-1), packed_mask, GateConfig(block_size=2),
                    cu_seqlens=torch.tensor([0, 6, 12], dtype=torch.int32))


def test_bf16_inputs_match_float32_of_the_same_values():
    cur, old, mask, starts = random_batch(3, dtype=torch.bfloat16)
    g16, _ = drift_gates(cur, old, mask, GateConfig(block_size=8), response_starts=starts)
    g32, _ = drift_gates(cur.float(), old.float(), mask, GateConfig(block_size=8), response_starts=starts)
    torch.testing.assert_close(g16, g32)


def test_bad_inputs_are_named():
    cur, old, mask, _ = random_batch(0, b=2, s=5)
    with pytest.raises(ValueError, match="shapes differ"):
        drift_gates(cur, old[:, :4], mask)
    with pytest.raises(ValueError, match="cu_seqlens must be"):
        drift_gates(cur.reshape(-1), old.reshape(-1), mask.reshape(-1), cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="response_starts"):
        drift_gates(cur, old, mask, response_starts=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="needs span_starts"):
        drift_gates(cur, old, mask, GateConfig(granularity="span"))
    with pytest.raises(ValueError, match="granularity must be one of"):
        GateConfig(granularity="blocks")
    with pytest.raises(ValueError, match="needs a threshold"):
        GateConfig(gate_fn="hard")


def test_newline_spans_merge_split_and_fallback():
    nl = 9
    # offsets: newline tokens at 2, 4, 20 -> raw spans [0,3) [3,5) [5,21) [21,30)
    ids = torch.ones(30, dtype=torch.long)
    ids[[2, 4, 20]] = nl
    marks = newline_span_starts(ids, [nl], min_len=3, max_len=10)
    # [0,3) ok; [3,5) short -> merges into [3,21) which splits at 10: starts 3, 13; [21,30) ok.
    assert marks.nonzero().reshape(-1).tolist() == [0, 3, 13, 21]
    no_newline = newline_span_starts(torch.ones(10, dtype=torch.long), [nl], fallback_block=4)
    assert no_newline.nonzero().reshape(-1).tolist() == [0, 4, 8]
    # a short last span merges into the previous one; prompt positions are never marked
    ids = torch.ones(2, 12, dtype=torch.long)
    ids[:, 9] = nl
    marks = newline_span_starts(ids, [nl], min_len=4, max_len=100, response_starts=torch.tensor([0, 2]))
    assert marks[0].nonzero().reshape(-1).tolist() == [0]
    assert marks[1].nonzero().reshape(-1).tolist() == [2]
