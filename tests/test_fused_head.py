"""The LM head over hidden states and the output weight shard (``LMHead.of_hidden``, the fused output layer) at
TP 1/2/4 over gloo: values and gradients of hidden and weight of every op against (a) float64 full-vocabulary
single-process math on hidden @ W^T and (b) the same op on the head over logits (``LMHead.of_logits`` of float32
hidden @ W_shard^T, the hidden gradient all-reduced over TP as Megatron's column-parallel output layer does). One
spawn of 4 processes runs every case; the tests assert on the errors."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_distributed

from megatron_bpd import vocab_parallel as vp
from megatron_bpd.losses import topk_lsm_loss

# name: (tokens, h, padded V, vocab_size, dtype, temperature, K, chunk_tokens)
CASES = {
    "f32_k_ids": (9, 16, 96, None, torch.float32, 0.7, 3, 4),
    "padded_90_of_128": (7, 12, 128, 90, torch.float32, 1.0, 4, 3),  # TP4: the last rank holds only padding
    "bf16": (6, 16, 96, None, torch.bfloat16, 1.3, 2, 5),
}
TP_SIZES = (1, 2, 4)
OPS = ("logprobs", "logprobs_k", "entropy", "lsm", "token_loss")


def _make(case):
    n, h, padded, vocab_size, dtype, temperature, k, chunk = case
    vocab = padded if vocab_size is None else vocab_size
    gen = torch.Generator().manual_seed(7 + padded + n)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(padded, h, generator=gen) * 0.8).to(dtype)
    weight[vocab:] = 50.0  # padding rows: logits far above the real ones; they must never count
    labels = torch.randint(0, vocab, (n,), generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    teacher = torch.log_softmax(torch.randn(n, k, generator=gen), -1)
    mask = torch.rand(n, generator=gen) < 0.8
    gates = torch.rand(n, generator=gen) + 0.5
    w_pos = torch.randn(n, generator=gen, dtype=torch.float64)
    w_ids = torch.randn(n, k, generator=gen, dtype=torch.float64)
    starts = torch.rand(n, generator=gen) < 0.4  # where LMHead.token_loss may start a chunk
    return dict(hidden=hidden, weight=weight, labels=labels, ids=ids, teacher=teacher, mask=mask, gates=gates,
                w_pos=w_pos, w_ids=w_ids, vocab=vocab, starts=starts)


def _token_loss(d):
    """A per-position loss of the labels' log-probs, nonlinear (its gradient differs per position)."""
    return lambda part, lp: (d["w_pos"][part].to(lp.dtype) * lp + 0.1 * lp ** 2).sum()


def _objectives(d, temperature):
    """op -> (op(head), op on the logits head (None: the same), float64 full(logits64), weight): each returns a
    tensor whose weighted sum is back-propagated."""
    lsm_kw = dict(gates=d["gates"])
    ref_lp = lambda x: F.log_softmax(x / temperature, -1).gather(-1, d["labels"][:, None])[:, 0]  # noqa: E731
    return {
        "logprobs": (lambda head: head.logprobs(d["labels"], temperature), None, ref_lp, d["w_pos"]),
        "logprobs_k": (lambda head: head.logprobs(d["ids"], temperature), None,
                       lambda x: F.log_softmax(x / temperature, -1).gather(-1, d["ids"]), d["w_ids"]),
        "entropy": (lambda head: head.entropy(temperature), None,
                    lambda x: -(F.softmax(x / temperature, -1) * F.log_softmax(x / temperature, -1)).sum(-1),
                    d["w_pos"]),
        "lsm": (lambda head: head.lsm_loss(d["ids"], d["teacher"], d["mask"], **lsm_kw)[0], None,
                lambda x: topk_lsm_loss(x.gather(-1, d["ids"]), d["teacher"].double(), d["mask"], **lsm_kw)[0],
                torch.ones((), dtype=torch.float64)),
        # the gradient taken in the forward, on chunks cut where ``starts`` allows; on logits: back-propagated
        "token_loss": (lambda head: head.token_loss(d["labels"], _token_loss(d), temperature, d["starts"])[0],
                       lambda head: _token_loss(d)(slice(None), head.logprobs(d["labels"], temperature)),
                       lambda x: _token_loss(d)(slice(None), ref_lp(x)), torch.ones((), dtype=torch.float64)),
    }


def _shift_free(at):
    """Logits at ids ``[n, K]`` up to a per-position constant, made comparable: minus their first column."""
    return at - at[:, :1]


def _logits_at_errors(d, temperature, fused, unfused):
    """The raw logits at the LSM support that ``logprobs`` and ``token_loss`` read in their own pass, against the
    float64 logits (up to a per-position constant) and the log-probs those passes return."""
    ref = (d["hidden"].double() @ d["weight"].double().t())[:, :d["vocab"]]
    ref_at, ref_lp = _shift_free(ref.gather(-1, d["ids"])), F.log_softmax(ref / temperature, -1).gather(
        -1, d["labels"][:, None])[:, 0]
    out = {}
    for name, (lp, at) in dict(
            logprobs=fused.logprobs(d["labels"], temperature, logits_at=d["ids"]),
            logprobs_unfused=unfused.logprobs(d["labels"], temperature, logits_at=d["ids"]),
            token_loss=fused.token_loss(d["labels"], _token_loss(d), temperature, d["starts"], d["ids"])[1:]).items():
        out[name] = dict(at=_err(_shift_free(at), ref_at), lp=_err(lp, ref_lp), at_grad=at.requires_grad,
                         scale=max(ref_at.abs().max().item(), ref_lp.abs().max().item(), 1.0))
    return out


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _case_errors(case, rank, tp, group):
    n, h, padded, vocab_size, dtype, temperature, k, chunk = case
    d = _make(case)
    local = padded // tp
    rows = slice(rank * local, (rank + 1) * local)
    kw = dict(tp_group=group, vocab_size=vocab_size, chunk_tokens=chunk)
    out = {}
    for name, (op, on_logits, full, weight) in _objectives(d, temperature).items():
        hidden, w_shard = d["hidden"].clone().requires_grad_(), d["weight"][rows].clone().requires_grad_()
        value = op(vp.LMHead.of_hidden(hidden, w_shard, **kw))
        (value.double() * weight).sum().backward()
        # the unfused path: float32 logits of the shard, the ops on logits, the hidden grad summed over TP
        u_hidden, u_weight = d["hidden"].clone().requires_grad_(), d["weight"][rows].clone().requires_grad_()
        u_value = (on_logits or op)(vp.LMHead.of_logits(u_hidden.float() @ u_weight.float().t(), **kw))
        (u_value.double() * weight).sum().backward()
        u_grad_hidden = u_hidden.grad.float()
        if tp > 1:
            dist.all_reduce(u_grad_hidden, group=group)
        # float64 full vocabulary on one process
        r_hidden = d["hidden"].double().requires_grad_()
        r_weight = d["weight"].double().requires_grad_()
        r_value = full((r_hidden @ r_weight.t())[:, :d["vocab"]])
        (r_value * weight).sum().backward()
        out[name] = dict(
            dtype=value.dtype, grad_dtypes=(hidden.grad.dtype, w_shard.grad.dtype),
            value_ref=_err(value, r_value), hidden_ref=_err(hidden.grad, r_hidden.grad),
            weight_ref=_err(w_shard.grad, r_weight.grad[rows]),
            value_unfused=_err(value, u_value), hidden_unfused=_err(hidden.grad, u_grad_hidden),
            weight_unfused=_err(w_shard.grad, u_weight.grad),
            scale=max(r_value.abs().max().item(), r_hidden.grad.abs().max().item(), r_weight.grad.abs().max().item()),
            pad_rows_zero=bool((w_shard.grad[max(d["vocab"] - rank * local, 0):] == 0).all()))
    fused = vp.LMHead.of_hidden(d["hidden"], d["weight"][rows], **kw)
    unfused = vp.LMHead.of_logits(d["hidden"].float() @ d["weight"][rows].float().t(), **dict(kw, chunk_tokens=None))
    values, ids = fused.topk(k, temperature)
    u_values, u_ids = unfused.topk(k, temperature)
    ref = F.log_softmax((d["hidden"].double() @ d["weight"].double().t())[:, :d["vocab"]] / temperature, -1)
    ref_values = ref.topk(k, -1).values
    out["topk"] = dict(value_ref=_err(values, ref_values), ids_equal_unfused=torch.equal(ids, u_ids),
                       scale=max(ref_values.abs().max().item(), 1.0),
                       value_unfused=_err(values, u_values), ids_real=bool((ids < d["vocab"]).all()),
                       ids_match_values=_err(ref.gather(-1, ids), values), requires_grad=values.requires_grad)
    # the labels' log-probs read in the top-k's own pass over the vocabulary (the in-trainer teacher's scores)
    one_pass = fused.topk(k, temperature, logprobs_at=d["labels"])
    out["topk"].update(same_topk=torch.equal(one_pass[0], values) and torch.equal(one_pass[1], ids),
                       labels_lp=_err(one_pass[2], ref.gather(-1, d["labels"][:, None])[:, 0]))
    out["logits_at"] = _logits_at_errors(d, temperature, fused, unfused)
    return out


def _saved_shapes(rank, tp, group):
    """Shapes the autograd graph of the hidden-state head's logprobs + entropy + token_loss keeps for the backward."""
    n, h, v = 64, 8, 40
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        head = vp.LMHead.of_hidden(hidden, weight, group, chunk_tokens=4)
        lp = head.logprobs(torch.randint(0, v * tp, (n,)))
        ent = head.entropy()
        token, _, _ = head.token_loss(torch.randint(0, v * tp, (n,)), lambda part, lp: 2 * lp.sum())
    (lp.sum() + ent.sum() + token).backward()
    return shapes


def _run_cases(rank, world_size):
    from megatron.core import parallel_state

    from megatron_bpd import parallel

    by_tp = {}
    for tp in TP_SIZES:
        parallel.initialize(tp=tp, seed=1)
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        by_tp[tp] = {name: _case_errors(case, tp_rank, tp, group) for name, case in CASES.items()}
        by_tp[tp]["saved_shapes"] = _saved_shapes(tp_rank, tp, group)
    parallel.destroy()
    return by_tp


@pytest.fixture(scope="module")
def all_results():
    return run_distributed(_run_cases, max(TP_SIZES))


@pytest.fixture(params=TP_SIZES, ids=lambda tp: f"tp{tp}")
def results(request, all_results):
    return request.param, [by_tp[request.param] for by_tp in all_results]


# float32: a few ulps of float32 relative to the largest value; bf16 inputs: the same (both paths upcast the
# bf16 values and accumulate in float32) but the gradients come back rounded to bf16.
TOL = {torch.float32: dict(value=2e-6, grad=2e-6), torch.bfloat16: dict(value=2e-6, grad=8e-3)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("op", OPS)
def test_fused_ops_match_float64_reference_and_unfused_path(results, case, op):
    tp, per_rank = results
    tol = TOL[CASES[case][4]]
    for rank, res in enumerate(per_rank):
        r = res[case][op]
        where = f"tp{tp} rank {rank} {case} {op}: {r}"
        assert r["dtype"] == torch.float32 and r["grad_dtypes"] == (CASES[case][4],) * 2, where
        scale = max(r["scale"], 1)
        assert r["value_ref"] <= tol["value"] * scale and r["value_unfused"] <= 1e-6 * scale, where
        for grad in ("hidden", "weight"):
            assert r[f"{grad}_ref"] <= tol["grad"] * scale and r[f"{grad}_unfused"] <= tol["grad"] * scale, where
        assert r["pad_rows_zero"], where


@pytest.mark.parametrize("case", list(CASES))
def test_logits_at_the_support_come_with_the_log_probs_in_one_pass(results, case):
    tp, per_rank = results
    tol = TOL[CASES[case][4]]["value"]
    for rank, res in enumerate(per_rank):
        for name, r in res[case]["logits_at"].items():
            where = f"tp{tp} rank {rank} {case} {name}: {r}"
            assert r["at"] <= 4 * tol * r["scale"] and r["lp"] <= tol * r["scale"] and not r["at_grad"], where


@pytest.mark.parametrize("case", list(CASES))
def test_fused_topk_matches_reference_and_unfused_path(results, case):
    tp, per_rank = results
    for rank, res in enumerate(per_rank):
        r = res[case]["topk"]
        assert r["ids_real"] and r["ids_equal_unfused"] and not r["requires_grad"], (tp, rank, case, r)
        tol = 1e-6 * r["scale"]  # float32 log-probs: a few ulps of the largest
        assert r["value_ref"] <= tol and r["value_unfused"] <= tol and r["ids_match_values"] <= tol, r
        assert r["same_topk"] and r["labels_lp"] <= tol, r


def test_backward_keeps_no_logits(results):
    """Only [n] statistics, [n] ids and the inputs are saved: nothing of [n, V/tp] (n = 64, V/tp = 40)."""
    tp, per_rank = results
    for res in per_rank:
        shapes = res["saved_shapes"]
        assert shapes and all(s in {(64,), (64, 1), (64, 8), (40, 8)} for s in shapes), shapes


def test_fused_argument_errors():
    hidden, weight = torch.zeros(3, 4), torch.zeros(8, 4)
    head = vp.LMHead.of_hidden
    with pytest.raises(ValueError, match="do not fit"):
        head(hidden, torch.zeros(8, 5))
    with pytest.raises(ValueError, match="float tensors"):
        head(hidden.long(), weight)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 6\)"):
        head(hidden, weight, vocab_size=6).logprobs(torch.tensor([0, 6, 1]))
    with pytest.raises(ValueError, match="do not match hidden"):
        head(hidden, weight).logprobs(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"chunk_starts has shape \[2\], labels \[3\]"):
        head(hidden, weight).token_loss(torch.tensor([0, 1, 2]), lambda part, lp: lp.sum(),
                                        chunk_starts=torch.ones(2, dtype=torch.bool))
    token, _, _ = head(hidden.requires_grad_(), weight).token_loss(torch.tensor([0, 1, 2]), lambda part, lp: lp.sum())
    token.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same forward twice"):
        token.backward()
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        head(hidden, weight, chunk_tokens=0)
    with pytest.raises(ValueError, match="k must be"):
        head(hidden, weight).topk(9)


def test_token_loss_chunks_start_where_allowed():
    """Chunks cover [0, n) in order, start only at allowed positions, and are as long as the chunk allows."""
    from megatron_bpd.vocab_parallel.fused import chunks_at

    starts = torch.zeros(20, dtype=torch.bool)
    starts[[0, 3, 4, 9, 10, 18]] = True
    assert [(p.start, p.stop) for p in chunks_at(20, 5, starts)] == [(0, 4), (4, 9), (9, 10), (10, 18), (18, 20)]
    assert [(p.start, p.stop) for p in chunks_at(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert chunks_at(0, 3, torch.zeros(0, dtype=torch.bool)) == []



def test_fused_sampled_token_loss_names_the_chunk_of_a_nan_log_prob():
    """The loss taken in the forward checks the log-probs chunk by chunk; the error says where the chunk lies."""
    from megatron_bpd.gating import GateConfig, plan_segments
    from megatron_bpd.train.batch import MicroBatch
    from megatron_bpd.train.loss import LossConfig, gradient_in_forward, opd_loss

    gen = torch.Generator().manual_seed(0)
    b, s, h, v = 2, 6, 4, 10
    labels = torch.randint(0, v, (b, s), generator=gen)
    old = -torch.rand(b, s, generator=gen)
    old[1, 4] = float("nan")
    config = LossConfig(gate=GateConfig(block_size=3), chunk_tokens=3)
    plan = plan_segments((b, s), config.gate)
    batch = MicroBatch(tokens=labels, labels=labels, loss_mask=torch.ones(b, s, dtype=torch.bool), old_logprobs=old,
                       segment_ids=plan.segment_ids, plan=plan, teacher_logprobs=old.nan_to_num())
    head = vp.LMHead.of_hidden(torch.randn(b, s, h, generator=gen, requires_grad=True),
                               torch.randn(v, h, generator=gen), chunk_tokens=config.chunk_tokens)
    assert gradient_in_forward(head, batch, config)
    where = r"non-finite old_logprobs at valid position \[1\] .*\(in the chunk of flat positions \[9, 12\) of 12"
    with pytest.raises(ValueError, match=where):
        opd_loss(head, batch, config, batch.num_tokens)
