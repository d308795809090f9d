"""No pass of a trainer step holds the logits: with ``loss.fused_head`` the old log-probs recomputed, the in-trainer
teacher's scores, the loss's pre-pass (log-probs and entropy), the support-KL probe and the training forward and
backward neither create, nor save for the backward, nor return a tensor of [tokens, V/tp] elements, at TP 2 on a
tiny Qwen3 whose vocabulary (V = 4096) is much larger than its hidden size (h = 32). Without the fused head the same
watch sees the logits, so the check is live."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distributed import run_distributed

B, S, VOCAB, HIDDEN, TP = 8, 64, 4096, 32, 2
LOGITS = B * S * VOCAB // TP  # elements of this rank's logits [tokens, V/tp]


class Largest(TorchDispatchMode):
    """The largest tensor (elements) that any op creates while active, backward included, and the op."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def _largest_returned(outputs) -> int:
    return max((t.numel() for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)), default=0)


def _passes(rank, world_size, hf_dir, fused_head):
    """{pass: (largest created, largest saved for backward, largest returned)} in elements, on this rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd import parallel
    from megatron_bpd.gating import GateConfig, plan_segments
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.train.batch import MicroBatch
    from megatron_bpd.train.forward_step import make_forward_step
    from megatron_bpd.train.loss import LossConfig
    from megatron_bpd.train.scoring import ScoringPass, forward_only, logprobs_pass, teacher_pass
    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training, zero_grads

    parallel.initialize(tp=TP, seed=0)
    model = build_model(hf_dir, transformer_impl="local")
    load_hf_weights(model, hf_dir, progress=False)
    ddp, optimizer = wrap_for_training(model, OptimizerSettings(optimizer="sgd", lr=1e-3, clip_grad=0.0))
    config = LossConfig(gate=GateConfig(block_size=8), vocab_size=VOCAB, fused_head=fused_head, chunk_tokens=16)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(VOCAB, (B, S + 1), generator=g)
    plan = plan_segments((B, S), config.gate)
    top_ids = torch.randint(VOCAB, (B, S, 4), generator=g)
    batch = MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(B, S, dtype=torch.bool),
                       old_logprobs=-8 - torch.rand(B, S, generator=g), segment_ids=plan.segment_ids, plan=plan,
                       teacher_logprobs=-torch.rand(B, S, generator=g) * 8, teacher_topk_ids=top_ids,
                       teacher_topk_logprobs=torch.log_softmax(torch.randn(B, S, 4, generator=g), -1))

    def train():
        zero_grads(ddp, optimizer)
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(config, batch.num_tokens, 1), data_iterator=iter([batch]),
            model=[ddp], num_microbatches=1, seq_length=S, micro_batch_size=B, forward_only=False)

    scoring = {"recompute": logprobs_pass(config, 1.0), "teacher": teacher_pass(config, 8),
               "pre_pass": ScoringPass(config, lambda head, b: {"lp": head.logprobs(b.labels),
                                                                 "entropy": head.entropy()}),
               "probe": ScoringPass(config, lambda head, b: head.lsm_loss(b.teacher_topk_ids,
                                                                          b.teacher_topk_logprobs, b.loss_mask)[1])}
    passes = {name: (lambda p=p: forward_only(ddp, [batch], p, S)) for name, p in scoring.items()}
    passes["train"] = train
    out = {}
    for name, run in passes.items():
        saved = []
        with Largest() as watch, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            returned = run()
        out[name] = dict(created=watch.numel, op=watch.op, saved=max(saved, default=0),
                         returned=_largest_returned(returned))
    parallel.destroy()
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return str(make_tiny_qwen3(tmp_path_factory.mktemp("wide"), layers=1, hidden=HIDDEN, heads=4, kv_heads=2,
                               head_dim=8, ffn=64, vocab=VOCAB, tied=False, seed=0))


@pytest.mark.parametrize("fused_head", [True, False], ids=["fused", "unfused"])
def test_no_pass_holds_the_logits(hf_dir, fused_head):
    for rank_result in run_distributed(_passes, TP, hf_dir, fused_head):
        assert set(rank_result) == {"recompute", "teacher", "pre_pass", "probe", "train"}
        for name, r in rank_result.items():
            if fused_head:  # the largest: the gradient buffer of all parameters (2 V/tp h + the layer)
                assert max(r["created"], r["saved"], r["returned"]) < LOGITS // 4, (name, r)
            else:
                assert r["created"] >= LOGITS, (name, r)
