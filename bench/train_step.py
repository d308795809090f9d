"""The training step that the step benchmarks (``bench_gate_step.py``, ``bench_drift_controls.py``) time.

One process (TP 1), a random tiny Qwen3 (``--hidden``, ``--layers``, ``--vocab``), ``--batch`` sequences of ``--seq``
random tokens (the first quarter prompt) with random pi_old, teacher and behavior log-probs, SGD; a step is what the
trainer's update runs: Megatron's forward_backward_func with the OPD loss and the optimizer step, on a fresh copy of
the weights. ``FunctionTimer`` adds up the time spent in functions of ``megatron_bpd.train.loss`` within the steps.
"""

import tempfile
import time

import torch

from megatron_bpd.gating import GateConfig, plan_segments


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)


def random_rollout(batch: int, seq: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab, (batch, seq + 1), generator=g)
    starts = torch.full((batch,), seq // 4)
    mask = torch.arange(seq)[None] >= starts[:, None]
    old = -torch.rand(batch, seq, generator=g) * 2 - 4
    teacher = -torch.rand(batch, seq, generator=g) * 8
    behavior = old + 0.2 * torch.randn(batch, seq, generator=g)  # a sampler a few versions behind pi_old
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], starts=starts, mask=mask, old=old, teacher=teacher,
                behavior=behavior)


def micro_batch(data: dict, gate: GateConfig):
    from megatron_bpd.train.batch import MicroBatch

    plan = plan_segments(data["mask"].shape, gate, response_starts=data["starts"])
    return MicroBatch(tokens=data["tokens"], labels=data["labels"], loss_mask=data["mask"], old_logprobs=data["old"],
                      segment_ids=plan.segment_ids, plan=plan, teacher_logprobs=data["teacher"],
                      behavior_logprobs=data["behavior"])


class FunctionTimer:
    """Wraps the functions ``names`` of ``megatron_bpd.train.loss`` to add up the seconds spent in them."""

    def __init__(self, *names: str):
        from megatron_bpd.train import loss

        self.seconds = 0.0
        for name in names:
            setattr(loss, name, self._timed(getattr(loss, name)))

    def _timed(self, inner):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed


class TrainStep:
    """``TrainStep(cli)(loss_config, batch, prepare)`` -> seconds of one step; ``prepare()`` (inside the timing)
    returns more keyword arguments of ``make_forward_step``, as the trainer computes them before the step."""

    def __init__(self, cli):
        torch.set_num_threads(1)
        from megatron_bpd import parallel
        from megatron_bpd.models.qwen3 import build_model
        from megatron_bpd.models.tiny import make_tiny_qwen3
        from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training

        parallel.initialize(tp=1, seed=0)
        self.cli = cli
        self.hf_dir = make_tiny_qwen3(tempfile.mkdtemp(), layers=cli.layers, hidden=cli.hidden, heads=4, kv_heads=2,
                                      head_dim=cli.hidden // 4, ffn=3 * cli.hidden, vocab=cli.vocab, tied=False)
        self.model = build_model(self.hf_dir, transformer_impl="local")
        self.ddp, self.optimizer = wrap_for_training(self.model, OptimizerSettings(optimizer="sgd", lr=1e-3,
                                                                                    clip_grad=0.0))

    def __call__(self, config, batch, prepare=dict) -> float:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_bpd.models.qwen3 import load_hf_weights
        from megatron_bpd.train.forward_step import make_forward_step
        from megatron_bpd.train.setup import zero_grads

        load_hf_weights(self.model, self.hf_dir, progress=False)
        zero_grads(self.ddp, self.optimizer)
        start = time.perf_counter()
        forward_step = make_forward_step(config, batch.num_tokens, 1, **prepare())
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[self.ddp],
                                    num_microbatches=1, seq_length=self.cli.seq, micro_batch_size=self.cli.batch,
                                    forward_only=False)
        self.optimizer.step()
        return time.perf_counter() - start

    @staticmethod
    def close() -> None:
        from megatron_bpd import parallel

        parallel.destroy()
