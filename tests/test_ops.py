"""The segment ops: extension vs the PyTorch reference, hand-computed numbers, opcheck, torch.compile, backend
selection, a compile check of the CUDA kernel, and (``-m gpu``) the CUDA kernel against the reference and the CPU
kernel."""

import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bpd import ops

ROOT = Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(not ops.extension_available(),
                                     reason="megatron_bpd._C is not built (pip install -e . builds it)")
STATS = tuple(ops.STATISTICS)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _fresh_backend(monkeypatch):
    monkeypatch.setattr(ops, "_backend", None)
    monkeypatch.delenv("MEGATRON_BPD_BACKEND", raising=False)


def random_segments(rng, n):
    """Sorted, non-overlapping segments with gaps, length-1 segments and sometimes none at all."""
    starts, ends, t = [], [], 0
    if rng.random() < 0.1:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    while True:
        t += 0 if rng.random() < 0.6 else rng.randint(1, 20)
        length = 1 if rng.random() < 0.2 else rng.randint(1, 100)
        if t + length > n:
            break
        starts.append(t)
        ends.append(t + length)
        t += length
    return torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def random_case(seed, n, dtype, bad_valid=0):
    """Log-probs, a mask with fully masked segments, NaN/inf at masked (and uncovered) positions, and
    `bad_valid` non-finite values at valid covered positions; returns the inputs and the expected first_bad."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(n, generator=gen)
    cur = old + 0.5 * torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < rng.choice([0.3, 0.9, 1.0])
    seg_start, seg_end = random_segments(rng, n)
    for s in range(len(seg_start)):
        if rng.random() < 0.1:
            mask[seg_start[s]:seg_end[s]] = False
    covered = torch.zeros(n, dtype=torch.bool)
    for a, b in zip(seg_start.tolist(), seg_end.tolist()):
        covered[a:b] = True
    for target in (cur, old):  # ignored: masked or uncovered
        ignored = torch.nonzero(~mask | ~covered).flatten().tolist()
        for t in rng.sample(ignored, min(len(ignored), 5)):
            target[t] = rng.choice([math.nan, math.inf, -math.inf])
    first_bad = -1
    candidates = torch.nonzero(mask & covered).flatten().tolist()
    if bad_valid and candidates:
        bad = rng.sample(candidates, min(len(candidates), bad_valid))
        for t in bad:
            rng.choice([cur, old])[t] = rng.choice([math.nan, math.inf, -math.inf])
        first_bad = min(bad)
    return (cur.to(dtype), old.to(dtype), mask, seg_start, seg_end), first_bad


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_against_reference(inputs, first_bad, statistic, gate_fn, normalize, tau=0.7, threshold=0.3):
    """The extension's ops on ``inputs`` (any device) against the reference; returns the extension's
    (segment_drift_stats, block_drift_gates) outputs."""
    ops.set_backend("extension")
    got_stats = ops.segment_drift_stats(*inputs, statistic)
    got = ops.block_drift_gates(*inputs, statistic, gate_fn, tau, threshold, normalize)
    want_stats = ops.reference_segment_drift_stats(*inputs, statistic)
    want = ops.reference_block_drift_gates(*inputs, statistic, gate_fn, tau, threshold, normalize)
    assert int(got_stats[2]) == int(want_stats[2]) == int(got[4]) == int(want[4]) == first_bad
    if first_bad >= 0:  # NaN/inf reach the statistics; callers raise
        return got_stats, got
    for name, a, b in zip(("seg_sum", "seg_count"), got_stats, want_stats):
        assert a.dtype == b.dtype == torch.float32
        close(a, b, name)
    for name, a, b in zip(("gates", "seg_stat", "seg_count", "seg_gate"), got, want):
        assert a.dtype == b.dtype == torch.float32
        close(a, b, name)
    seg_value = got[3]
    close(ops.segment_broadcast(seg_value, inputs[3], inputs[4], inputs[0].numel()),
          ops.reference_segment_broadcast(seg_value, inputs[3], inputs[4], inputs[0].numel()), "broadcast")
    return got_stats, got


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed example (independent of both implementations)
# ---------------------------------------------------------------------------------------------------------------

# Segments [0, 3) and [4, 7); position 3 and 7 uncovered. Drifts d = cur - old:
#   segment 0: -0.5, 0.5, -1.0 (all valid)           -> count 3
#   segment 1: 0.5, (masked NaN), 1.0                 -> count 2
HAND = dict(
    cur=[0.0, -1.0, -2.0, 5.0, 0.5, math.nan, 1.0, 3.0],
    old=[0.5, -1.5, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    mask=[True, True, True, False, True, False, True, True],
    seg_start=[0, 4],
    seg_end=[3, 7],
)
# statistic -> (sum_0, sum_1), (D_0, D_1)
HAND_STATS = {
    "signed_mean": ((-1.0, 1.5), (-1 / 3, 0.75)),
    "abs_mean": ((2.0, 1.5), (2 / 3, 0.75)),
    "rms": ((1.5, 1.25), (math.sqrt(0.5), math.sqrt(0.625))),
}


def hand_inputs(**changes):
    values = {**HAND, **changes}
    return (torch.tensor(values["cur"]), torch.tensor(values["old"]), torch.tensor(values["mask"]),
            torch.tensor(values["seg_start"]), torch.tensor(values["seg_end"]))


@pytest.mark.parametrize("backend", ["reference", pytest.param("extension", marks=needs_extension)])
def test_hand_computed(backend):
    ops.set_backend(backend)
    inputs = hand_inputs()
    for statistic, (sums, stats) in HAND_STATS.items():
        seg_sum, seg_count, first_bad = ops.segment_drift_stats(*inputs, statistic)
        close(seg_sum, torch.tensor(sums), statistic)
        close(seg_count, torch.tensor([3.0, 2.0]), statistic)
        assert int(first_bad) == -1
        _, seg_stat, _, _, _ = ops.block_drift_gates(*inputs, statistic)
        close(seg_stat, torch.tensor(stats), statistic)

    # exp gate, tau = 1, signed mean: g = (exp(-1/3), exp(-0.75)) = (0.7165313106, 0.4723665527);
    # normalization 5 / (3 * 0.7165313106 + 2 * 0.4723665527) = 5 / 3.0943270372 = 1.6158602306
    gates, _, _, seg_gate, _ = ops.block_drift_gates(*inputs, "signed_mean", "exp", 1.0, 0.0, False)
    close(seg_gate, torch.tensor([0.7165313106, 0.4723665527]), "raw exp gate")
    gates, _, _, seg_gate, _ = ops.block_drift_gates(*inputs, "signed_mean", "exp", 1.0, 0.0, True)
    g0, g1 = 0.7165313106 * 1.6158602306, 0.4723665527 * 1.6158602306
    close(seg_gate, torch.tensor([g0, g1]), "normalized exp gate")
    close(gates, torch.tensor([g0, g0, g0, 1.0, g1, g1, g1, 1.0]), "exp gates")
    assert abs((3 * g0 + 2 * g1) / 5 - 1) < 1e-6  # the mean over valid covered positions is 1

    # hard gate, threshold 0.5: |D| = (1/3, 0.75) -> (1, 0); normalization 5 / 3
    gates, *_ = ops.block_drift_gates(*inputs, "signed_mean", "hard", 1.0, 0.5, True)
    close(gates, torch.tensor([5 / 3, 5 / 3, 5 / 3, 1.0, 0.0, 0.0, 0.0, 1.0]), "hard gates")
    # every gate 0: the denominator is 0, so no normalization
    gates, *_ = ops.block_drift_gates(*inputs, "signed_mean", "hard", 1.0, 0.1, True)
    close(gates, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]), "all-zero hard gates")
    # no valid position at all: C = 0, gates of 1 and D = 0
    gates, seg_stat, seg_count, _, _ = ops.block_drift_gates(*hand_inputs(mask=[False] * 8))
    close(gates, torch.ones(8), "no valid position")
    close(seg_count, torch.zeros(2), "no valid position")
    close(seg_stat, torch.zeros(2), "no valid position")

    # a non-finite value at a valid covered position is reported; at an uncovered one it is not
    assert int(ops.block_drift_gates(*hand_inputs(cur=HAND["cur"][:4] + [math.inf] + HAND["cur"][5:]))[4]) == 4
    assert int(ops.block_drift_gates(*hand_inputs(old=HAND["old"][:2] + [math.nan] + HAND["old"][3:]))[4]) == 2
    assert int(ops.block_drift_gates(*hand_inputs(cur=HAND["cur"][:7] + [math.nan]))[4]) == -1
    # finite inputs whose drift overflows are not "bad" (the sum is inf, first_bad stays -1)
    seg_sum, _, first_bad = ops.segment_drift_stats(*hand_inputs(cur=[3e38] * 8, old=[-3e38] * 8))
    assert seg_sum.tolist() == [math.inf, math.inf] and int(first_bad) == -1
    with pytest.raises(ValueError, match="non-finite log-prob at valid position 4"):
        ops.raise_if_bad(ops.segment_drift_stats(*hand_inputs(cur=HAND["cur"][:4] + [-math.inf] + HAND["cur"][5:]))[2])

    # broadcast: uncovered positions are 1
    close(ops.segment_broadcast(torch.tensor([2.0, 3.0]), inputs[3], inputs[4], 9),
          torch.tensor([2.0, 2.0, 2.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.0]), "broadcast")


# ---------------------------------------------------------------------------------------------------------------
# Extension vs reference
# ---------------------------------------------------------------------------------------------------------------

@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("statistic", STATS)
def test_random_against_reference(dtype, statistic):
    for seed in range(12):
        n = [0, 1, 7, 64, 500, 3000][seed % 6]
        inputs, first_bad = random_case(seed, n, dtype)
        for gate_fn in ops.GATE_FNS:
            for normalize in (False, True):
                check_against_reference(inputs, first_bad, statistic, gate_fn, normalize)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_bad_against_reference(dtype):
    for seed in range(20):
        inputs, first_bad = random_case(100 + seed, [5, 200, 2500][seed % 3], dtype, bad_valid=1 + seed % 4)
        check_against_reference(inputs, first_bad, "signed_mean", "exp", True)


@needs_extension
def test_parallel_path(monkeypatch):
    """Inputs large enough to split over threads: reductions and the first bad position across chunks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed, bad_valid in ((0, 0), (1, 0), (2, 6)):
            inputs, first_bad = random_case(seed, 150_000, torch.bfloat16, bad_valid=bad_valid)
            check_against_reference(inputs, first_bad, "rms", "exp", True)
    finally:
        torch.set_num_threads(threads)


@needs_extension
@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12)), max_size=12),
    tail=st.integers(0, 4),
    data=st.data(),
    statistic=st.sampled_from(STATS),
    gate_fn=st.sampled_from(tuple(ops.GATE_FNS)),
    normalize=st.booleans(),
)
def test_hypothesis_against_reference(lengths, tail, data, statistic, gate_fn, normalize):
    starts, ends, t = [], [], 0
    for gap, length in lengths:  # (gap before, length) pairs; zero-length segments included
        starts.append(t + gap)
        ends.append(t + gap + length)
        t += gap + length
    n = t + tail
    values = st.floats(-8, 0, width=32)
    cur = torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)
    old = torch.tensor(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    inputs = (cur, old, mask, torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long))
    check_against_reference(inputs, -1, statistic, gate_fn, normalize, tau=1.3, threshold=0.5)


@needs_extension
@pytest.mark.parametrize("backend", ["reference", "extension"])
def test_empty_and_detached(backend):
    ops.set_backend(backend)
    empty_f, empty_l = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    for n, starts, ends in ((0, [], []), (5, [], []), (0, [0, 0], [0, 0])):
        cur = torch.zeros(n)
        seg = torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)
        gates, seg_stat, seg_count, seg_gate, first_bad = ops.block_drift_gates(cur, cur, cur > 0, *seg)
        assert gates.tolist() == [1.0] * n and seg_count.tolist() == [0.0] * len(starts) and int(first_bad) == -1
        assert ops.segment_drift_stats(cur, cur, cur > 0, *seg)[0].shape == (len(starts),)
        assert ops.segment_broadcast(torch.zeros(len(starts)), *seg, n).tolist() == [1.0] * n
    assert ops.segment_broadcast(empty_f, empty_l, empty_l, 0).shape == (0,)
    cur = torch.randn(6, requires_grad=True)
    outs = ops.block_drift_gates(cur, cur.detach() + 1, torch.ones(6, dtype=torch.bool), torch.tensor([0, 3]),
                                 torch.tensor([3, 6]))
    assert not any(t.requires_grad for t in outs)
    # mixed or unsupported dtypes go in as float32
    gates64 = ops.block_drift_gates(cur.double(), cur.detach().half(), torch.ones(6, dtype=torch.bool),
                                    torch.tensor([0]), torch.tensor([6]))[0]
    assert gates64.dtype == torch.float32


@needs_extension
def test_input_checks():
    cur, mask, seg = torch.zeros(8), torch.ones(8, dtype=torch.bool), (torch.tensor([0, 4]), torch.tensor([3, 8]))
    op = torch.ops.megatron_bpd.block_drift_gates
    cases = [
        ((cur.long(), cur.long(), mask, *seg, 0, 0, 1.0, 0.0, True), "cur must be float32"),
        ((cur, cur.half(), mask, *seg, 0, 0, 1.0, 0.0, True), "old must have the dtype of cur"),
        ((cur, cur[:7], mask, *seg, 0, 0, 1.0, 0.0, True), "same length"),
        ((cur.view(2, 4), cur.view(2, 4), mask.view(2, 4), *seg, 0, 0, 1.0, 0.0, True), "must be 1-D"),
        ((cur, cur, mask.float(), *seg, 0, 0, 1.0, 0.0, True), "mask must be bool"),
        ((cur, cur, mask, seg[0].int(), seg[1], 0, 0, 1.0, 0.0, True), "must be int64"),
        ((cur, cur, mask, seg[0][:1], seg[1], 0, 0, 1.0, 0.0, True), "same length"),
        ((cur, cur, mask, *seg, 3, 0, 1.0, 0.0, True), "statistic must be"),
        ((cur, cur, mask, *seg, 0, 2, 1.0, 0.0, True), "gate_fn must be"),
        ((cur, cur, mask, torch.tensor([0, 2]), torch.tensor([3, 8]), 0, 0, 1.0, 0.0, True), "non-overlapping"),
        ((cur, cur, mask, torch.tensor([4, 0]), torch.tensor([8, 3]), 0, 0, 1.0, 0.0, True), "sorted"),
        ((cur, cur, mask, torch.tensor([0, 4]), torch.tensor([3, 9]), 0, 0, 1.0, 0.0, True), "beyond n = 8"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
    with pytest.raises(RuntimeError, match="seg_value must be float32"):
        torch.ops.megatron_bpd.segment_broadcast(torch.zeros(2, dtype=torch.long), *seg, 8)
    with pytest.raises(RuntimeError, match="one value per segment"):
        torch.ops.megatron_bpd.segment_broadcast(torch.zeros(3), *seg, 8)
    with pytest.raises(ValueError, match="unknown statistic"):
        ops.block_drift_gates(cur, cur, mask, *seg, "mean")
    with pytest.raises(ValueError, match="unknown gate_fn"):
        ops.block_drift_gates(cur, cur, mask, *seg, "rms", "soft")


# ---------------------------------------------------------------------------------------------------------------
# The CUDA kernel (GPU machines)
# ---------------------------------------------------------------------------------------------------------------

# Odd sizes: partial warps and blocks, segments longer and shorter than a block, one launch of ~20k segments.
CUDA_SIZES = (0, 1, 7, 33, 257, 3001, 65_537, 1_000_003)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("statistic", STATS)
def test_cuda_kernel_matches_reference_and_cpu_kernel(dtype, statistic, record_property):
    assert ops._has_kernel(torch.device("cuda")), \
        "megatron_bpd._C has no CUDA kernel: rebuild it with a GPU visible (or MEGATRON_BPD_FORCE_CUDA=1)"
    worst = 0.0
    for seed, n in enumerate(CUDA_SIZES):
        for bad_valid in (0, 3):  # with non-finite values at valid positions: first_bad through atomicMin
            inputs, first_bad = random_case(seed + 100 * bad_valid, n, dtype, bad_valid=bad_valid)
            for gate_fn in ops.GATE_FNS:
                for normalize in (False, True):
                    on_gpu = check_against_reference(tuple(t.cuda() for t in inputs), first_bad, statistic, gate_fn,
                                                     normalize)
                    on_cpu = (ops.segment_drift_stats(*inputs, statistic),  # the CPU kernel (backend: extension)
                              ops.block_drift_gates(*inputs, statistic, gate_fn, 0.7, 0.3, normalize))
                    if first_bad >= 0:
                        assert int(on_cpu[0][2]) == int(on_cpu[1][4]) == first_bad
                        continue
                    for gpu_out, cpu_out in zip(on_gpu, on_cpu):
                        for a, b in zip(gpu_out, cpu_out):
                            close(a.cpu(), b, f"CUDA vs CPU kernel, n={n}")
                            if a.is_floating_point() and a.numel():
                                worst = max(worst, (a.cpu() - b).abs().max().item())
    record_property("max_abs_diff_cuda_vs_cpu_kernel", worst)


# ---------------------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------------

def opcheck_samples():
    for seed, n, dtype in ((0, 40, torch.float32), (1, 300, torch.bfloat16), (2, 1, torch.float16)):
        inputs, _ = random_case(seed, n, dtype)
        yield inputs


@needs_extension
def test_opcheck():
    for inputs in opcheck_samples():
        n = inputs[0].numel()
        for statistic in (0, 2):
            torch.library.opcheck(torch.ops.megatron_bpd.segment_drift_stats.default, (*inputs, statistic))
            torch.library.opcheck(torch.ops.megatron_bpd.block_drift_gates.default,
                                  (*inputs, statistic, statistic % 2, 0.5, 0.2, statistic == 0))
        seg_value = torch.rand(inputs[3].numel())
        torch.library.opcheck(torch.ops.megatron_bpd.segment_broadcast.default, (seg_value, inputs[3], inputs[4], n))


@needs_extension
def test_torch_compile():
    inputs, _ = random_case(3, 500, torch.float32)

    def gated_mean(cur, old, mask, seg_start, seg_end):
        gates, seg_stat, seg_count, seg_gate, first_bad = torch.ops.megatron_bpd.block_drift_gates(
            cur, old, mask, seg_start, seg_end, 0, 0, 1.0, 0.0, True)
        seg_sum, _, _ = torch.ops.megatron_bpd.segment_drift_stats(cur, old, mask, seg_start, seg_end, 1)
        again = torch.ops.megatron_bpd.segment_broadcast(seg_gate, seg_start, seg_end, cur.shape[0])
        return (gates * mask).sum() + seg_sum.sum() + again.sum(), first_bad

    torch._dynamo.reset()
    compiled = torch.compile(gated_mean, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(*inputs), gated_mean(*inputs)):
        close(got, want, "compiled")

    ops.set_backend("extension")
    wrapper = torch.compile(lambda *a: ops.block_drift_gates(*a, "rms", "hard", 1.0, 0.1)[0], backend="aot_eager")
    close(wrapper(*inputs), ops.block_drift_gates(*inputs, "rms", "hard", 1.0, 0.1)[0], "compiled wrapper")


# ---------------------------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------------------------

def count_reference_calls(monkeypatch):
    calls = []
    original = ops.reference_block_drift_gates
    monkeypatch.setattr(ops, "reference_block_drift_gates", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def call_gate():
    x = torch.zeros(4)
    return ops.block_drift_gates(x, x, x == 0, torch.tensor([0]), torch.tensor([4]))


def test_backend_selection(monkeypatch):
    calls = count_reference_calls(monkeypatch)
    assert ops.get_backend() == "auto"
    call_gate()
    assert len(calls) == (0 if ops.extension_available() else 1)

    monkeypatch.setenv("MEGATRON_BPD_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    call_gate()
    assert len(calls) == (1 if ops.extension_available() else 2)

    ops.set_backend("auto")  # set_backend wins over the environment
    assert ops.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("cuda")
    monkeypatch.setattr(ops, "_backend", None)
    monkeypatch.setenv("MEGATRON_BPD_BACKEND", "fast")
    with pytest.raises(ValueError, match="MEGATRON_BPD_BACKEND: unknown backend 'fast'"):
        call_gate()


def test_extension_requested_but_unavailable(monkeypatch):
    monkeypatch.setattr(ops, "_EXTENSION", False)
    calls = count_reference_calls(monkeypatch)
    assert not ops.extension_available()
    call_gate()  # auto falls back to the reference
    assert len(calls) == 1
    monkeypatch.setenv("MEGATRON_BPD_BACKEND", "extension")
    with pytest.raises(RuntimeError, match="'extension' requested but the extension megatron_bpd._C is not built"):
        call_gate()
    ops.set_backend("extension")
    monkeypatch.setenv("MEGATRON_BPD_BACKEND", "reference")
    with pytest.raises(RuntimeError, match="is not built"):
        ops.segment_drift_stats(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool),
                                torch.tensor([0]), torch.tensor([2]))


@needs_extension
def test_extension_without_cuda_kernel(monkeypatch):
    if ops._has_kernel(torch.device("cuda")):
        pytest.skip("this build has a CUDA kernel")
    ops.set_backend("extension")
    with pytest.raises(RuntimeError, match="has no cuda kernel"):
        ops._use_extension(torch.device("cuda"))
    ops.set_backend("auto")
    assert not ops._use_extension(torch.device("cuda"))


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernel compile check (nvcc, no GPU needed)
# ---------------------------------------------------------------------------------------------------------------

def test_cuda_kernel_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    needed = ("c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h", "c10/cuda/CUDAException.h",
              "c10/cuda/impl/cuda_cmake_macros.h")
    missing = [h for h in needed if not any((Path(d) / h).exists() for d in includes)]
    if missing:
        pytest.skip(f"this torch ({torch.__version__}) lacks CUDA headers the kernel needs: {missing}")
    command = [
        nvcc, "-c", "-arch=sm_90", "-std=c++20", "-O3", "--use_fast_math", "-DMEGATRON_BPD_WITH_CUDA",
        *cpp_extension.COMMON_NVCC_FLAGS, *(f"-I{d}" for d in includes), f"-I{ROOT / 'csrc'}",
        str(ROOT / "csrc" / "cuda" / "segment_drift_cuda.cu"), "-o", str(tmp_path / "k.o"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "k.o").stat().st_size > 0
