"""One optimizer step of gated OPD through Megatron-Core's pipeline schedules, DDP and optimizer on a tiny Qwen3
GPTModel (local spec, qk_layernorm, GQA): the loss and the updated weights are the same under DP4, TP2xDP2,
PP2xDP2 and TP2xPP2 (four processes), and equal to the same step taken with Hugging Face transformers'
Qwen3ForCausalLM and the single-process losses. The fused output-layer head (the default) and the unfused one
(logits, then the ops on logits) give the same step, with untied and tied embeddings. Each loss runs with a drift
control (m2po's batch cutoff over the DP ranks of the last pipeline stage; token_drop and its penalty), written
from the formulas in the reference."""

import pytest
import torch

from distributed import run_distributed
from megatron_bpd.drift_controls import DriftControlConfig
from megatron_bpd.gating import GateConfig, drift_gates, plan_segments
from megatron_bpd.losses import sampled_token_opd_loss, topk_lsm_loss

B, S, K, VOCAB, LR = 4, 16, 4, 300, 0.5
MICRO_BATCHES = [[0], [1], [2], [3]]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP) on 4 processes: DP4, TP2xDP2, PP2xDP2, TP2xPP2
GATE = GateConfig(block_size=4)
KINDS = ["sampled_token", "topk_lsm"]
CONTROLS = {"sampled_token": DriftControlConfig("m2po"),  # binds at some positions of this batch (both)
            "topk_lsm": DriftControlConfig("token_drop", drop_below=0.002, penalty=0.05)}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return str(make_tiny_qwen3(tmp_path_factory.mktemp("tiny"), layers=2, hidden=64, heads=4, kv_heads=2,
                               head_dim=16, ffn=96, vocab=VOCAB, tied=False, seed=0))


def make_data():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(VOCAB, (B, S + 1), generator=g)
    starts = torch.tensor([2, 5, 0, 3])
    mask = torch.arange(S)[None] >= starts[:, None]
    old = -torch.rand(B, S, generator=g) * 2 - 4.5  # near log(1/300): the behaviour policy of a random model
    teacher = -torch.rand(B, S, generator=g) * 8
    top_ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(B * S)]).view(B, S, K)
    top_lp = torch.log_softmax(torch.randn(B, S, K, generator=g), -1) - 0.3
    behavior = old + 0.3 * torch.randn(B, S, generator=g)
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], starts=starts, mask=mask, old=old, teacher=teacher,
                top_ids=top_ids, top_lp=top_lp, behavior=behavior)


def micro_batch(data, rows):
    from megatron_bpd.train.batch import MicroBatch

    plan = plan_segments((len(rows), S), GATE, response_starts=data["starts"][rows])
    return MicroBatch(tokens=data["tokens"][rows], labels=data["labels"][rows], loss_mask=data["mask"][rows],
                      old_logprobs=data["old"][rows], segment_ids=plan.segment_ids, plan=plan,
                      teacher_logprobs=data["teacher"][rows], teacher_topk_ids=data["top_ids"][rows],
                      teacher_topk_logprobs=data["top_lp"][rows], behavior_logprobs=data["behavior"][rows])


def _train_one_step(rank, world_size, hf_dir):
    return {(tp, pp, kind): _one_step(rank, tp, pp, hf_dir, kind) for tp, pp in LAYOUTS for kind in KINDS}


def _one_step(rank, tp, pp, hf_dir, kind, fused_head=True):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd import parallel
    from megatron_bpd.models.qwen3 import build_model, iter_hf_weights, load_hf_weights
    from megatron_bpd.train.forward_step import make_forward_step
    from megatron_bpd.train.loss import LossConfig, m2po_batch_cutoff
    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training, zero_grads

    parallel.initialize(tp=tp, pp=pp, seed=5)
    model = build_model(hf_dir, transformer_impl="local")
    load_hf_weights(model, hf_dir, progress=False)
    ddp_model, optimizer = wrap_for_training(model, OptimizerSettings(optimizer="sgd", lr=LR, clip_grad=0.0))
    zero_grads(ddp_model, optimizer)
    data = make_data()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    batches = [micro_batch(data, rows) for rows in MICRO_BATCHES[dp_rank::dp]]
    config = LossConfig(kind=kind, gate=GATE, vocab_size=VOCAB, fused_head=fused_head, drift_control=CONTROLS[kind])
    cutoff = None
    if CONTROLS[kind].kind == "m2po":  # as the trainer: over the step's micro-batches on every DP rank of the stage
        cutoff = m2po_batch_cutoff(batches, CONTROLS[kind], ps.get_data_parallel_group(with_context_parallel=True))
    forward_step = make_forward_step(config, data["mask"].sum(), len(batches), m2_cutoff=cutoff)
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp_model],
        num_microbatches=len(batches), seq_length=S, micro_batch_size=1, forward_only=False)
    update_ok, _, _ = optimizer.step()
    assert update_ok
    weights = {name: tensor.clone() for name, tensor in iter_hf_weights(model)}
    last = ps.is_pipeline_last_stage()
    loss = torch.tensor(sum(o["loss"].item() for o in out) if last else 0.0)
    import torch.distributed as dist

    dist.all_reduce(loss, group=ps.get_data_parallel_group())  # the batch loss: the sum over DP ranks
    support_kl = [o["support_kl"].item() for o in out] if last and kind == "sampled_token" else None
    return dict(loss=loss.item() if last else None, weights=weights if rank == 0 else None, support_kl=support_kl)


def hf_one_step(hf_dir, kind):
    """The same step with transformers' Qwen3ForCausalLM and the single-process gate and losses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    data = make_data()
    num_tokens = data["mask"].sum()
    control, log_rho = CONTROLS[kind], data["old"] - data["behavior"]
    kept = sorted((log_rho[data["mask"]] ** 2).tolist())  # M2PO: drop the largest until the mean is <= threshold
    while sum(kept) / len(kept) > control.m2_threshold:
        kept.pop()
    total = 0.0
    for rows in MICRO_BATCHES:
        logits = model(data["tokens"][rows]).logits.float()
        cur = torch.log_softmax(logits, -1).gather(-1, data["labels"][rows][..., None])[..., 0]
        gates, _ = drift_gates(cur, data["old"][rows], data["mask"][rows], GATE, response_starts=data["starts"][rows])
        behavior = data["behavior"][rows]
        if kind == "sampled_token":  # m2po
            weights = (log_rho[rows] ** 2 <= kept[-1]).float()
            loss, _ = sampled_token_opd_loss(cur, data["old"][rows], data["teacher"][rows], data["mask"][rows],
                                             gates * weights, num_tokens=num_tokens)
        else:  # token_drop: 1[p_cur - p_beh >= -below] and penalty * (lp_cur - lp_beh)^2
            weights = (cur.detach().exp() - behavior.exp() >= -control.drop_below).float()
            loss, _ = topk_lsm_loss(logits.gather(-1, data["top_ids"][rows]), data["top_lp"][rows],
                                    data["mask"][rows], gates * weights, num_tokens=num_tokens)
            penalty = control.penalty * (cur - behavior) ** 2
            loss = loss + (gates * penalty)[data["mask"][rows]].sum() / num_tokens
        valid = weights[data["mask"][rows]]
        assert valid.sum() > 0, rows
        loss.backward()
        total += loss.item()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return total, {name: p.detach() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references(tiny_model_dir):
    return {kind: hf_one_step(tiny_model_dir, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def layout_results(tiny_model_dir):
    return run_distributed(_train_one_step, 4, tiny_model_dir, timeout=1200)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=["DP4", "TP2xDP2", "PP2xDP2", "TP2xPP2"])
def test_one_step_same_under_every_layout_and_equal_to_transformers(tiny_model_dir, references, layout_results,
                                                                     tp, pp):
    for kind in KINDS:
        ref_loss, ref_weights = references[kind]
        results = [r[(tp, pp, kind)] for r in layout_results]
        loss = next(r["loss"] for r in results if r["loss"] is not None)
        assert loss == pytest.approx(ref_loss, rel=1e-5), (tp, pp)
        weights = results[0]["weights"]
        assert set(weights) == set(ref_weights)
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, rtol=1e-5, atol=2e-6, msg=f"TP{tp} PP{pp} {name}")
        changed = max((ref_weights[n] - w).abs().max().item() for n, w in _initial_weights(tiny_model_dir).items())
        assert changed > 1e-4, "the step did not change the weights: the test would not see a wrong gradient"


def _initial_weights(hf_dir):
    from safetensors.torch import load_file
    from pathlib import Path

    weights = {}
    for f in Path(hf_dir).glob("*.safetensors"):
        weights.update(load_file(f))
    return weights


# ------------------------------------------------------------------------------- fused head against unfused
FUSED_LAYOUTS = [(1, 1), (2, 2)]  # DP4 and TP2xPP2 (TP2 on the last stage, which holds a copy of tied embeddings)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return str(make_tiny_qwen3(tmp_path_factory.mktemp("tied"), layers=2, hidden=64, heads=4, kv_heads=2,
                               head_dim=16, ffn=96, vocab=VOCAB, tied=True, seed=3))


def _fused_and_unfused_steps(rank, world_size, dirs):
    return {(tied, tp, pp, kind, fused): _one_step(rank, tp, pp, hf_dir, kind, fused)
            for tied, hf_dir in dirs.items() for tp, pp in FUSED_LAYOUTS for kind in KINDS for fused in (True, False)}


@pytest.fixture(scope="module")
def fused_results(tiny_model_dir, tied_model_dir):
    return run_distributed(_fused_and_unfused_steps, 4, {False: tiny_model_dir, True: tied_model_dir}, timeout=1200)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", FUSED_LAYOUTS, ids=["DP4", "TP2xPP2"])
def test_fused_head_step_equals_unfused_step(fused_results, tiny_model_dir, tied_model_dir, tied, tp, pp):
    initial = _initial_weights(tied_model_dir if tied else tiny_model_dir)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    for kind in KINDS:
        fused, unfused = ([r[(tied, tp, pp, kind, f)] for r in fused_results] for f in (True, False))
        where = f"tied={tied} TP{tp} PP{pp} {kind}"
        losses = [next(r["loss"] for r in rs if r["loss"] is not None) for rs in (fused, unfused)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7), where
        if kind == "sampled_token":  # the logged support KL: the fused LSM head under no_grad
            kls = [next(r["support_kl"] for r in rs if r["support_kl"] is not None) for rs in (fused, unfused)]
            assert kls[0] == pytest.approx(kls[1], rel=1e-6, abs=1e-7), where
        weights, ref_weights = fused[0]["weights"], unfused[0]["weights"]
        assert set(weights) == set(ref_weights) and head in weights, where
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, rtol=1e-5, atol=2e-6, msg=f"{where} {name}")
        assert (weights[head] - initial[head]).abs().max() > 1e-3, f"{where}: the output weight did not move"
