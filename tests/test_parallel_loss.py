"""Gates, loss and the loss gradient are the same under TP2, CP2, TP2xCP2 and DP2 as on one process with the full
vocabulary and the unsplit sequences (plain log_softmax + drift_gates + losses, and the drift controls written from
their formulas), for both heads: vocab-parallel logits (gradient w.r.t. the logits) and the fused output layer
(gradients w.r.t. the hidden states and the weight shard; the sampled-token and SFT losses there take their gradient
in the forward where the layout allows, in chunks of CHUNK positions cut at gate-segment starts)."""

import dataclasses
import itertools

import pytest
import torch

from distributed import run_distributed
from megatron_bpd.drift_controls import DriftControlConfig
from megatron_bpd.gating import GateConfig, drift_gates, plan_segments
from megatron_bpd.losses import sampled_token_opd_loss, topk_lsm_loss

B, S, V, K, H = 4, 16, 24, 4, 8
CHUNK = 5  # the fused head's chunk: several chunks per micro-batch, cut at segment starts
HEADS = ("logits", "fused")
MICRO_BATCHES = [[0, 1], [2], [3]]  # the optimizer-step batch: micro-batches of one or two sequences
LAYOUTS = [(2, 1), (1, 2), (2, 2), (1, 1)]  # (TP, CP) on 4 processes: TP2xDP2, CP2xDP2, TP2xCP2, DP4
GATES = [GateConfig(block_size=3), GateConfig(block_size=5, scope="sequence", statistic="abs_mean"),
         GateConfig(block_size=4, scope="global", tau=2.0)]
LOSSES = ["sampled_token", "topk_lsm"]
# every gate with both OPD losses (and one more sampled-token case), and the ungated NLL of the "sft" control
CASES = [(gate, kind) for gate in GATES for kind in LOSSES] + [(GATES[0], "sampled_token"),
                                                               (GateConfig(granularity="none"), "sft")]
# a drift control per OPD case, with parameters at which it binds on this batch (advantage_from "current" with the
# two-sided token drop): tis and the two-sided token drop with the fused head's in-forward gradient, seq_mask's
# per-sequence means and m2po's batch moment split over CP and DP ranks
CONTROLS = [DriftControlConfig("tis", cap=1.5), DriftControlConfig("token_drop", drop_below=0.01, penalty=0.05),
            DriftControlConfig("seq_mask", seq_bounds=(0.95, 1.05)), DriftControlConfig("m2po"),
            DriftControlConfig("token_drop", drop_below=0.01, drop_above=0.03, penalty=0.05),
            DriftControlConfig("m2po", m2_threshold=0.03), DriftControlConfig("icepop", ratio_bounds=(0.8, 1.25)),
            DriftControlConfig()]


def options(case: int) -> dict:
    """The LossConfig options of case ``case`` beside its gate and kind: its drift control; the sampled-token loss with
    the global-scope gate also runs dual-clip PPO (c = 1.5 binds at some positions of this batch) and recomputes
    its advantage from the current student, so that those options are checked on both heads and every layout."""
    gate, kind = CASES[case]
    extra = dict(dual_clip=1.5, advantage_from="current") if kind == "sampled_token" and gate is GATES[2] else {}
    return dict(drift_control=CONTROLS[case], **extra)


def reference_control(data, control, cur):
    """(w [B, S], pen [B, S]) of ``control`` over the whole batch, from the formulas, in float64."""
    old, behavior, mask = data["old"].double(), data["behavior"].double(), data["mask"]
    rho = torch.exp(old - behavior)
    penalty = torch.zeros_like(cur)
    if control.kind == "token_drop":
        diff = cur.detach().exp() - behavior.exp()
        above = float("inf") if control.drop_above is None else control.drop_above
        weights = ((diff >= -control.drop_below) & (diff <= above)).double()
        penalty = control.penalty * (cur - behavior) ** 2
    elif control.kind == "icepop":
        weights = rho * ((rho >= control.ratio_bounds[0]) & (rho <= control.ratio_bounds[1]))
    elif control.kind == "tis":
        weights = rho.clamp(max=control.cap)
    elif control.kind == "seq_mask":
        mean = torch.stack([(old - behavior)[r][mask[r]].mean() for r in range(B)]).exp()
        weights = rho * ((mean >= control.seq_bounds[0]) & (mean <= control.seq_bounds[1]))[:, None]
    elif control.kind == "m2po":  # drop the largest (log rho)^2 until the rest's mean is <= the threshold
        kept = sorted(((old - behavior)[mask] ** 2).tolist())
        while sum(kept) / len(kept) > control.m2_threshold:
            kept.pop()
        weights = ((old - behavior) ** 2 <= kept[-1]).double()
    else:
        weights = torch.ones_like(rho)
    assert 0 < weights[mask].sum() and (control.kind in ("tis", "none") or (weights[mask] == 0).any()), control
    return torch.where(mask, weights, 0.0), torch.where(mask, penalty, 0.0)


def make_batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2 / H ** 0.5)
    logits = hidden @ weight.t()
    labels = torch.randint(V, (B, S), generator=g)
    starts = torch.tensor([3, 0, 5, 2])
    mask = torch.rand(B, S, generator=g) < 0.9
    mask &= torch.arange(S)[None] >= starts[:, None]
    old = torch.log_softmax(logits + 0.4 * torch.randn(B, S, V, generator=g), -1).gather(-1, labels[..., None])[..., 0]
    teacher_logits = torch.randn(B, S, V, generator=g) * 3
    teacher = torch.log_softmax(teacher_logits, -1)
    top = teacher.topk(K, -1)
    behavior = old + 0.3 * torch.randn(B, S, generator=g)  # a sampler some versions behind pi_old
    return dict(hidden=hidden, weight=weight, logits=logits, labels=labels, starts=starts, mask=mask, old=old,
                teacher=teacher.gather(-1, labels[..., None])[..., 0], top_ids=top.indices, top_lp=top.values,
                behavior=behavior)


def reference(data, case):
    """(loss, gates [B, S], grads of the loss w.r.t. the full logits, the hidden states and the weight) on one
    process, in float64."""
    gate, kind = CASES[case]
    control, extra = CONTROLS[case], options(case)
    hidden, weight = data["hidden"].double().requires_grad_(), data["weight"].double().requires_grad_()
    logits = hidden @ weight.t()
    logits.retain_grad()
    num_tokens = data["mask"].sum()
    cur_all = torch.log_softmax(logits, -1).gather(-1, data["labels"][..., None])[..., 0]
    normalizer = None
    if gate.scope == "global":
        raw = dataclasses.replace(gate, normalize=False)
        normalizer = sum(drift_gates(cur_all[r].detach(), data["old"][r].double(), data["mask"][r], raw,
                                     response_starts=data["starts"][r])[1]["normalizer_terms"]
                         for r in MICRO_BATCHES)
    weights_all, penalty_all = reference_control(data, control, cur_all)
    total, all_gates = 0.0, torch.zeros(B, S)
    for rows in MICRO_BATCHES:
        cur = cur_all[rows]
        gates, _ = drift_gates(cur, data["old"][rows].double(), data["mask"][rows], gate,
                               response_starts=data["starts"][rows], normalizer=normalizer)
        all_gates[rows] = gates
        if kind == "sft":
            loss = -(cur * data["mask"][rows]).sum() / num_tokens
        elif kind == "sampled_token":
            loss, _ = sampled_token_opd_loss(cur, data["old"][rows].double(), data["teacher"][rows].double(),
                                             data["mask"][rows], gates * weights_all[rows], num_tokens=num_tokens,
                                             dual_clip=extra.get("dual_clip"),
                                             advantage_from=extra.get("advantage_from", "old"))
        else:
            student = logits[rows].gather(-1, data["top_ids"][rows])
            loss, _ = topk_lsm_loss(student, data["top_lp"][rows].double(), data["mask"][rows],
                                    gates * weights_all[rows], num_tokens=num_tokens)
        total = total + loss + (gates * penalty_all[rows]).sum() / num_tokens
    total.backward()
    return total.item(), all_gates, dict(logits=logits.grad, hidden=hidden.grad, weight=weight.grad)


def _worker(rank, world_size):
    """Every layout of LAYOUTS in turn on the same 4 processes (the parallel state is rebuilt for each)."""
    return {layout: _layout_results(*layout) for layout in LAYOUTS}


def _layout_results(tp, cp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_bpd import parallel
    from megatron_bpd.parallel.context_parallel import cp_positions
    from megatron_bpd.train.batch import MicroBatch
    from megatron_bpd.train.loss import LossConfig, gradient_in_forward, m2po_batch_cutoff, opd_loss
    from megatron_bpd.vocab_parallel import LMHead

    parallel.initialize(tp=tp, cp=cp, seed=1)
    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_group, cp_group = ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group()
    data = make_batch()
    vocab = slice(tp_rank * V // tp, (tp_rank + 1) * V // tp)
    positions, _ = cp_positions((B, S), cp, cp_rank)
    my_micro = [MICRO_BATCHES[i] for i in range(dp_rank, len(MICRO_BATCHES), dp_size)]
    num_tokens = data["mask"].sum()
    weight_shard = data["weight"][vocab].clone().requires_grad_()
    out = {}
    for case, head in itertools.product(range(len(CASES)), HEADS):
        gate, kind = CASES[case]
        config = LossConfig(kind=kind, gate=gate, chunk_tokens=CHUNK, **options(case))

        def local(rows, cfg):
            """(this rank's share of the micro-batch, its LMHead over logits [b, s/cp, V/tp] or hidden states)"""
            plan = plan_segments((len(rows), S), cfg.gate, response_starts=data["starts"][rows])
            batch = MicroBatch(tokens=data["labels"][rows], labels=data["labels"][rows],
                               loss_mask=data["mask"][rows], old_logprobs=data["old"][rows],
                               segment_ids=plan.segment_ids, plan=plan, teacher_logprobs=data["teacher"][rows],
                               teacher_topk_ids=data["top_ids"][rows], teacher_topk_logprobs=data["top_lp"][rows],
                               behavior_logprobs=data["behavior"][rows])
            kw = dict(tp_group=tp_group, vocab_size=cfg.vocab_size, chunk_tokens=cfg.chunk_tokens)
            if head == "logits":
                inputs = data["logits"][rows][:, positions, vocab].clone().requires_grad_()
                return batch.split_for_cp(cp, cp_rank), inputs, LMHead.of_logits(inputs, **kw)
            inputs = data["hidden"][rows][:, positions].clone().requires_grad_()
            return batch.split_for_cp(cp, cp_rank), inputs, LMHead.of_hidden(inputs, weight_shard, **kw)

        m2_cutoff = None
        if config.drift_control.kind == "m2po":  # over every micro-batch of the step, on every DP and CP rank
            m2_cutoff = m2po_batch_cutoff([local(rows, config)[0] for rows in my_micro], config.drift_control,
                                          ps.get_data_parallel_group(with_context_parallel=True))
        normalizer = None
        if gate.scope == "global":  # the no-grad pre-pass over every micro-batch of the step
            raw = dataclasses.replace(config, gate=dataclasses.replace(gate, normalize=False))
            normalizer = torch.zeros(2, dtype=torch.float64)
            for rows in my_micro:
                batch, _, lm_head = local(rows, raw)
                with torch.no_grad():
                    normalizer += opd_loss(lm_head, batch, raw, num_tokens, cp_group=cp_group,
                                           m2_cutoff=m2_cutoff)[1]["normalizer_terms"]
            dist.all_reduce(normalizer, group=ps.get_data_parallel_group())
        results = []
        for rows in my_micro:
            batch, inputs, lm_head = local(rows, config)
            loss, metrics = opd_loss(lm_head, batch, config, num_tokens, cp_group=cp_group, normalizer=normalizer,
                                     m2_cutoff=m2_cutoff)
            loss.backward()
            results.append(dict(rows=rows, loss=loss.item(), grad=inputs.grad, gates=metrics["gates"],
                                in_forward=gradient_in_forward(lm_head, batch, config, cp_group),
                                metrics={k: v.item() for k, v in metrics.items() if v.dim() == 0},
                                terms=metrics["normalizer_terms"]))
        # the weight shard's gradient of all of this rank's micro-batches (DDP sums it over DP and CP)
        out[(case, head)] = dict(parts=results, weight_grad=weight_shard.grad)
        weight_shard.grad = None
    return dict(positions=positions, vocab=(vocab.start, vocab.stop), out=out)


@pytest.fixture(scope="module")
def layout_results():
    return run_distributed(_worker, 4)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("tp,cp", LAYOUTS, ids=["TP2xDP2", "CP2xDP2", "TP2xCP2", "DP4"])
def test_loss_and_gradients_match_one_process(layout_results, tp, cp, head):
    data = make_batch()
    results = [r[(tp, cp)] for r in layout_results]
    for case, (gate, kind) in enumerate(CASES):
        ref_loss, ref_gates, ref_grads = reference(data, case)
        shape = (B, S, V) if head == "logits" else (B, S, H)
        grad = torch.full(shape, float("nan"))
        gates = torch.full((B, S), float("nan"))
        weight_grad = torch.zeros(V, H)
        total = 0.0
        for rank_result in results:
            lo, hi = rank_result["vocab"]
            pos = rank_result["positions"]
            mine = rank_result["out"][(case, head)]
            for part in mine["parts"]:
                sub = grad[part["rows"]]
                sub[(slice(None), pos) + ((slice(lo, hi),) if head == "logits" else ())] = part["grad"]
                grad[part["rows"]] = sub
                gate_rows = gates[part["rows"]]
                gate_rows[:, pos] = part["gates"]
                gates[part["rows"]] = gate_rows
                if lo == 0:  # each (micro-batch, CP share) counted once, not once per TP rank
                    total += part["loss"]
                # the fast path exactly where the layout allows it: no CP split, one normalization factor
                assert part["in_forward"] == (head == "fused" and cp == 1 and gate.scope != "sequence"), (gate, kind)
            if mine["weight_grad"] is not None:
                weight_grad[lo:hi] += mine["weight_grad"]
        assert not torch.isnan(grad).any(), "some positions got no gradient"
        torch.testing.assert_close(gates, ref_gates, rtol=1e-5, atol=1e-6, msg=f"gates {gate} {kind}")
        assert total == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), (gate, kind, CONTROLS[case])
        ref_grad = ref_grads["logits" if head == "logits" else "hidden"].float()
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=f"{gate} {kind} {CONTROLS[case]}")
        if head == "fused":
            torch.testing.assert_close(weight_grad, ref_grads["weight"].float(), rtol=1e-4, atol=1e-6,
                                       msg=f"weight {gate} {kind} {CONTROLS[case]}")


def test_metrics_are_the_same_from_either_head_and_support_kl_matches_one_process(layout_results):
    """The fused head keeps each chunk's gates, PPO terms and drift weights where it takes the loss's gradient in
    the forward, and reads the student's logits on the teacher's support in the same pass as its log-probs: every
    0-d metric (support_kl, the PPO, gate and drift-control summaries) and the normalizer terms of each micro-batch
    equal the logits head's, and support_kl that of one float64 process (layouts without CP: whole sequences)."""
    data = make_batch()
    logits = data["logits"].double()
    for rank_results in layout_results:
        for (tp, cp), res in rank_results.items():
            for case in range(len(CASES)):
                pairs = zip(res["out"][(case, "logits")]["parts"], res["out"][(case, "fused")]["parts"])
                for unfused, fused in pairs:
                    where = (tp, cp, case, unfused["rows"])
                    assert fused["metrics"].keys() == unfused["metrics"].keys() and "support_kl" in fused["metrics"]
                    for key, value in unfused["metrics"].items():
                        assert fused["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (where, key)
                    torch.testing.assert_close(fused["terms"], unfused["terms"], rtol=1e-6, atol=1e-6)
                    if cp == 1:
                        rows = unfused["rows"]
                        _, ref = topk_lsm_loss(logits[rows].gather(-1, data["top_ids"][rows]),
                                               data["top_lp"][rows].double(), data["mask"][rows])
                        assert fused["metrics"]["support_kl"] == pytest.approx(ref["support_kl"].item(), rel=1e-5,
                                                                               abs=1e-6), where


def _packed_cp_gates(rank, world_size):
    import torch.distributed as dist

    from megatron_bpd.gating import gates_for_segments
    from megatron_bpd.parallel.context_parallel import cp_positions, group_sum, split_for_cp

    dist.init_process_group("gloo")
    cur, old, mask, cu, starts, span_starts = packed_batch()
    config = GateConfig(granularity="span", scope="sequence")
    plan = plan_segments(cur.shape, config, cu_seqlens=cu, response_starts=starts, span_starts=span_starts)
    index, local_cu = cp_positions(cur.shape, world_size, rank, cu_seqlens=cu)
    local = [split_for_cp(t, index, 0) for t in (cur, old, mask, plan.segment_ids)]
    gates, stats = gates_for_segments(*local[:3], local[3], plan, config, reduce=group_sum(dist.group.WORLD))
    return dict(index=index, gates=gates, local_cu=local_cu, drift=stats["drift_abs_mean"])


def packed_batch():
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, 8, 32, 44], dtype=torch.int32)  # lengths 8, 24, 12: multiples of 2*CP = 4
    n = int(cu[-1])
    old = -torch.rand(n, generator=g) * 3
    cur = old + torch.randn(n, generator=g) * 0.5
    mask = torch.rand(n, generator=g) < 0.9
    span_starts = torch.rand(n, generator=g) < 0.2
    return cur, old, mask, cu, torch.tensor([2, 5, 0]), span_starts


def test_packed_thd_spans_under_cp2_equal_unsplit():
    cur, old, mask, cu, starts, span_starts = packed_batch()
    expected, stats = drift_gates(cur, old, mask, GateConfig(granularity="span", scope="sequence"), cu_seqlens=cu,
                                  response_starts=starts, span_starts=span_starts)
    results = run_distributed(_packed_cp_gates, 2)
    gates = torch.full_like(expected, float("nan"))
    for r in results:
        gates[r["index"]] = r["gates"]
        assert r["local_cu"].tolist() == [0, 4, 16, 22]
        assert r["drift"].item() == pytest.approx(stats["drift_abs_mean"].item(), rel=1e-6)
    torch.testing.assert_close(gates, expected)


def test_cp_chunk_layout_is_megatrons_and_bad_lengths_are_named():
    from megatron_bpd.parallel.context_parallel import cp_chunk_positions, cp_positions

    assert cp_chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_chunk_positions(12, 3, 1).tolist() == [2, 3, 8, 9]
    with pytest.raises(ValueError, match="not divisible by 2\\*CP = 4"):
        cp_chunk_positions(10, 2, 0)
    with pytest.raises(ValueError, match="packed sequence 1"):
        cp_positions((12,), 2, 0, cu_seqlens=torch.tensor([0, 4, 10, 12]))
