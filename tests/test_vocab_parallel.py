"""The LM head's ops on vocab-parallel logits (``LMHead.of_logits``) at TP 1/2/4 over gloo against a single-process
float64 full-vocabulary reference on the CPU, and (``-m gpu``) the same cases on CUDA tensors over NCCL at TP 1 (TP 2
with two GPUs).

One spawn per layout runs every case (``_run_cases``) and reports errors; the tests below assert on them.
"""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed

from megatron_bpd import vocab_parallel as vp


# ----------------------------------------------------------------------------------------------- reference
def _reference(full, vocab_size, temperature):
    """float64 log-softmax over the unpadded vocabulary of the full (unsharded) logits."""
    return F.log_softmax(full[..., :vocab_size].double() / temperature, -1)


def _grad_of(fn, full, weight):
    """Gradient of sum(weight * fn(x)) wrt the float64 full logits."""
    x = full.double().requires_grad_()
    (fn(x) * weight).sum().backward()
    return x.grad


def _shard_of(full, rank, tp, device="cpu"):
    local = full.shape[-1] // tp
    return full[..., rank * local:(rank + 1) * local].to(device, copy=True).requires_grad_()


def _head(logits, group, vocab_size=None, chunk=None):
    return vp.LMHead.of_logits(logits, group, vocab_size, chunk)


def _err(a, b):
    """Max abs difference, on the CPU (``a`` may live on the GPU, the float64 references do not)."""
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


# --------------------------------------------------------------------------------------------------- cases
# name: (shape without V, padded V, vocab_size, dtype, scale, temperature, K or None, chunk_size)
CASES = {
    "bsv_one_id": ((2, 5), 96, None, torch.float32, 3.0, 1.0, None, 3),
    "packed_k_ids": ((9,), 96, None, torch.float32, 3.0, 0.7, 4, 4),
    "bf16": ((3, 4), 96, None, torch.bfloat16, 3.0, 1.3, 3, 5),
    "magnitude_1e4": ((7,), 96, None, torch.float32, 1e4, 1.0, 2, 3),
    "padded_1000_of_1024": ((2, 3), 1024, 1000, torch.float32, 3.0, 1.0, 5, 4),
    "last_rank_all_padding": ((5,), 128, 90, torch.float32, 3.0, 0.9, 3, 2),
}
GRAD_TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2}  # the gradient comes back in the logits' dtype


def _value_tol(ref):
    """float32 results: a few ulps of the largest reference value (|log p| reaches 4e4 for logits of 1e4)."""
    return 3e-6 + 2e-7 * ref.abs().max().item()


def _make(case, rank, tp):
    lead, padded, vocab_size, dtype, scale, temperature, k, chunk = case
    vocab = padded if vocab_size is None else vocab_size
    gen = torch.Generator().manual_seed(1000 + padded + len(lead))
    full = (torch.randn(*lead, padded, generator=gen) * scale).to(dtype)
    full[..., vocab:] = 1e6  # padding: huge values that must never enter a softmax or win a top-K
    ids = torch.randint(0, vocab, (*lead, k) if k else lead, generator=gen)
    weight_ids = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    weight_pos = torch.randn(lead, generator=gen, dtype=torch.float64)
    return full, ids, weight_ids, weight_pos, vocab


def _case_errors(case, rank, tp, group, device):
    lead, padded, vocab_size, dtype, scale, temperature, k, chunk = case
    full, ids, w_ids, w_pos, vocab = _make(case, rank, tp)
    ids_dev = ids.to(device)
    local = padded // tp
    cols = slice(rank * local, (rank + 1) * local)
    grad_tol = GRAD_TOL[dtype]
    out = {}

    def ref_logprobs(x):
        lsm = _reference(x, vocab, temperature)
        return lsm.gather(-1, ids) if k else lsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    def ref_entropy(x):
        lsm = _reference(x, vocab, temperature)
        return -(lsm.exp() * lsm).sum(-1)

    for name, ours, ref, weight in (
        ("logprobs", lambda s: _head(s, group, vocab_size, chunk).logprobs(ids_dev, temperature), ref_logprobs,
         w_ids),
        ("entropy", lambda s: _head(s, group, vocab_size, chunk).entropy(temperature), ref_entropy, w_pos),
        ("logits_at", lambda s: _head(s, group, vocab_size, chunk).logits_at(ids_dev),
         lambda x: x.gather(-1, ids if k else ids.unsqueeze(-1)).view(ids.shape), w_ids),
    ):
        shard = _shard_of(full, rank, tp, device)
        value = ours(shard)
        (value.double() * weight.to(device)).sum().backward()
        ref_value, ref_grad = ref(full.double()), _grad_of(ref, full, weight)[..., cols]
        out[name] = dict(value=_err(value, ref_value), grad=_err(shard.grad, ref_grad),
                         dtype=value.dtype, value_tol=_value_tol(ref_value), grad_tol=grad_tol,
                         pad_grad_zero=bool((shard.grad.reshape(-1, local)[:, max(vocab - rank * local, 0):] == 0)
                                            .all()))
    top_k = k or 3
    head = _head(_shard_of(full, rank, tp, device), group, vocab_size, chunk)
    values, top_ids = head.topk(top_k, temperature)
    with_lp = head.topk(top_k, temperature, logprobs_at=ids_dev)  # one pass: the same top-k and the ids' log-probs
    values, top_ids = values.cpu(), top_ids.cpu()
    ref_lsm = _reference(full, vocab, temperature)
    ref_at = ref_logprobs(full.double())
    out["topk_logprobs_at"] = dict(same_topk=torch.equal(with_lp[0].cpu(), values) and torch.equal(with_lp[1].cpu(),
                                                                                                    top_ids),
                                   value=_err(with_lp[2], ref_at), value_tol=_value_tol(ref_at),
                                   shape=tuple(with_lp[2].shape) == tuple(ids.shape))
    ref_values = ref_lsm.topk(top_k, -1).values
    # ids: distinct, real, and their reference log-probs are the top-k values (bf16 logits have ties)
    distinct = (top_ids.sort(-1).values.diff(dim=-1) != 0).all() if top_k > 1 else True
    ids_valid = (bool(distinct) and bool((top_ids < vocab).all())
                 and _err(ref_lsm.gather(-1, top_ids), ref_values) <= 1e-6)
    out["topk"] = dict(value=_err(values, ref_values), ids_valid=ids_valid,
                       value_tol=_value_tol(ref_values), sorted=bool((values[..., :-1] >= values[..., 1:]).all()),
                       requires_grad=values.requires_grad)
    return out


def _megatron_ce_errors(rank, tp, group, device):
    """-logprobs(one id) against megatron's vocab_parallel_cross_entropy (values and grads)."""
    from megatron.core import tensor_parallel

    gen = torch.Generator().manual_seed(5)
    full = torch.randn(4, 3, 32 * tp, generator=gen) * 4
    target = torch.randint(0, 32 * tp, (4, 3), generator=gen).to(device)
    weight = torch.randn(4, 3, generator=gen).to(device)
    ours_in, theirs_in = _shard_of(full, rank, tp, device), _shard_of(full, rank, tp, device)
    ours = -_head(ours_in, group, chunk=5).logprobs(target)
    theirs = tensor_parallel.vocab_parallel_cross_entropy(theirs_in.clone(), target)  # it edits its input
    (ours * weight).sum().backward()
    (theirs * weight).sum().backward()
    return dict(value=_err(ours, theirs), grad=_err(ours_in.grad, theirs_in.grad))


def _lsm_errors(rank, tp, group, device):
    """LMHead.lsm_loss against losses.topk_lsm_loss on the unsharded float64 logits."""
    from megatron_bpd.losses import topk_lsm_loss

    gen = torch.Generator().manual_seed(9)
    vocab, n, k = 90, 7, 4
    full = torch.randn(n, 128, generator=gen) * 3  # padded vocabulary
    support = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    teacher = torch.log_softmax(torch.randn(n, k, generator=gen), -1)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0])
    gates = torch.rand(n, generator=gen) + 0.5
    shard = _shard_of(full, rank, tp, device)
    loss, metrics = _head(shard, group, vocab).lsm_loss(support.to(device), teacher.to(device), mask.to(device),
                                                        gates=gates.to(device))
    loss.backward()
    ref_full = full.double().requires_grad_()
    ref_loss, ref_metrics = topk_lsm_loss(ref_full.gather(-1, support), teacher.double(), mask, gates=gates)
    ref_loss.backward()
    local = full.shape[-1] // tp
    return dict(value=abs(loss.item() - ref_loss.item()),
                grad=_err(shard.grad, ref_full.grad[:, rank * local:][:, :local]),
                kl=abs(metrics["support_kl"].item() - ref_metrics["support_kl"].item()))


def _padding_ids_error(rank, tp, group, device):
    shard = torch.zeros(2, 1024 // tp, device=device)
    try:
        _head(shard, group, 1000).logprobs(torch.tensor([3, 1010], device=device))
    except ValueError as e:
        return str(e)
    return None


def _run_cases(rank, world_size, tp_sizes):
    """Every case at each TP of ``tp_sizes`` in the same processes (the model-parallel state is rebuilt per TP), on
    ``parallel.compute_device()``: the CPU over gloo, or this rank's GPU over NCCL."""
    from megatron.core import parallel_state

    from megatron_bpd import parallel

    by_tp = {}
    for tp in tp_sizes:
        parallel.initialize(tp=tp, seed=1)
        device = parallel.compute_device()
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        results = {name: _case_errors(case, tp_rank, tp, group, device) for name, case in CASES.items()}
        results["megatron_ce"] = _megatron_ce_errors(tp_rank, tp, group, device)
        results["lsm"] = _lsm_errors(tp_rank, tp, group, device)
        results["padding_ids"] = _padding_ids_error(tp_rank, tp, group, device)
        results["device"] = str(device)
        by_tp[tp] = results
    parallel.destroy()
    return by_tp


TP_SIZES = (1, 2, 4)
# (device, TP): the CPU layouts over gloo, and CUDA over NCCL with one GPU per rank
LAYOUTS = [pytest.param(("cpu", tp), id=f"tp{tp}") for tp in TP_SIZES] + [
    pytest.param(("cuda", tp), id=f"cuda-tp{tp}", marks=pytest.mark.gpu) for tp in (1, 2)]


@pytest.fixture(scope="module")
def run_layout():
    """``run_layout(device, tp)`` -> per-rank results, spawned once per module: all CPU layouts in one group of
    max(TP_SIZES) processes, each CUDA layout in its own group of TP processes."""
    cache = {}

    def run(device, tp):
        key = "cpu" if device == "cpu" else tp
        if key not in cache:
            cache[key] = run_distributed(_run_cases, max(TP_SIZES), TP_SIZES) if device == "cpu" else \
                run_distributed(_run_cases, tp, (tp,))
        return cache[key]

    return run


@pytest.fixture(params=LAYOUTS)
def results(request, run_layout):
    """(tp, [results of each rank at that TP])."""
    device, tp = request.param
    if device == "cuda" and torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} on CUDA needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    per_rank = [by_tp[tp] for by_tp in run_layout(device, tp)]
    assert all(r["device"].startswith(device) for r in per_rank), [r["device"] for r in per_rank]
    return tp, per_rank


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", ["logprobs", "entropy", "logits_at"])
def test_differentiable_ops_match_reference(results, case, op):
    tp, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res[case][op]
        assert r["dtype"] == torch.float32
        assert r["value"] <= r["value_tol"], f"tp{tp} rank {rank} {case} {op} value error {r['value']}"
        assert r["grad"] <= r["grad_tol"], f"tp{tp} rank {rank} {case} {op} grad error {r['grad']}"
        assert r["pad_grad_zero"], f"tp{tp} rank {rank} {case} {op}: gradient on padded columns"


@pytest.mark.parametrize("case", list(CASES))
def test_topk_matches_reference(results, case):
    tp, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res[case]["topk"]
        assert r["ids_valid"], f"tp{tp} rank {rank} {case}: top-k ids are not a top-k of the reference"
        assert r["value"] <= r["value_tol"] and r["sorted"] and not r["requires_grad"], r
        r = res[case]["topk_logprobs_at"]
        assert r["same_topk"] and r["shape"] and r["value"] <= r["value_tol"], f"tp{tp} rank {rank} {case}: {r}"


def test_logprobs_equal_megatron_cross_entropy(results):
    tp, per_rank = results
    for res in per_rank:
        assert res["megatron_ce"]["value"] <= 2e-6 and res["megatron_ce"]["grad"] <= 2e-7, res["megatron_ce"]


def test_lsm_entry_point_matches_single_process_loss(results):
    tp, per_rank = results
    for res in per_rank:
        assert res["lsm"]["value"] <= 1e-6 and res["lsm"]["grad"] <= 1e-7 and res["lsm"]["kl"] <= 1e-6, res["lsm"]


def test_ids_in_padding_rejected_on_every_rank(results):
    tp, per_rank = results
    for res in per_rank:
        message = res["padding_ids"]
        assert message is not None and "1010" in message and "[0, 1000)" in message, message


# ------------------------------------------------------------------------------------- single-process errors
def test_argument_errors():
    logits = torch.zeros(3, 8)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 8\) \(padding or invalid\): \[-1, 9\]"):
        _head(logits, None).logprobs(torch.tensor([-1, 9, 2]))
    with pytest.raises(ValueError, match="do not match logits"):
        _head(logits, None).logprobs(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        _head(logits, None).logits_at(torch.zeros(3))
    with pytest.raises(ValueError, match="vocab_size 9 does not fit"):
        _head(logits, None, vocab_size=9)
    with pytest.raises(ValueError, match="temperature"):
        _head(logits, None).entropy(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        _head(logits, None, chunk=0)
    with pytest.raises(ValueError, match="k must be"):
        _head(logits, None).topk(9)
    with pytest.raises(ValueError, match="token_loss takes its gradient in the forward from hidden states"):
        _head(logits, None).token_loss(torch.zeros(3, dtype=torch.long), lambda part, lp: lp.sum())


def test_chunking_keeps_inputs_untouched_and_gives_same_result():
    logits = torch.randn(11, 40) * 5
    before = logits.clone()
    ids = torch.randint(0, 40, (11,))
    a = _head(logits, None, chunk=1).logprobs(ids)
    b = _head(logits, None, chunk=1000).logprobs(ids)
    c = _head(logits, None).logprobs(ids)  # default chunk: CHUNK_ELEMENTS float32
    assert torch.equal(logits, before) and (a - b).abs().max() <= 1e-6 and (a - c).abs().max() <= 1e-6


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_stats_match_reference(entropy, dtype):
    """core.chunk_stats on one chunk: max, log-sum-exp relative to it, local entropy and exp(x - max), against
    float64 math on the same values."""
    from megatron_bpd.vocab_parallel.core import chunk_stats

    rows = (torch.randn(7, 33) * 30).to(dtype)
    x = rows.double() / 0.7
    out = torch.empty(7, 33)
    exp_out = torch.empty(7, 33) if entropy else None
    m, log_s, ent, e = chunk_stats(rows, 0.7, out, exp_out)
    ref_m = x.amax(-1)
    torch.testing.assert_close(m.double(), ref_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_s.double(), torch.logsumexp(x, -1) - ref_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e.double(), torch.exp(x - ref_m[:, None]), rtol=1e-5, atol=1e-6)
    assert e.data_ptr() == (exp_out if entropy else out).data_ptr()
    if entropy:
        p = torch.softmax(x, -1)
        torch.testing.assert_close(ent.double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)
    else:
        assert ent is None
