"""The training step that the step benchmarks (``bench_gate_step.py``, ``bench_drift_controls.py``,
``bench_step_memory.py``, ``bench_train_step.py``) time: the trainer's own update (``train.update.Update``).

One process (TP 1), a tiny Qwen3 (``tiny_model``: ``--hidden``, ``--layers``, ``--vocab``) or any HF Qwen3 folder,
``random_rollout``: ``--batch`` trajectories of ``--seq`` random label positions (the first quarter prompt) with
random pi_old, teacher (token and top-K) and behavior log-probs. A step is what the trainer's update runs on them:
the loss's pre-pass, the m2po cutoff, Megatron's forward_backward_func with the OPD loss over the micro-batches and
the optimizer step. ``FunctionTimer`` adds up the time spent in functions of ``megatron_bpd.train.loss``.
"""

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from megatron_bpd.rollout.types import TeacherScores, TrajectoryBatch
from megatron_bpd.train.rollout_data import RolloutData


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)


def tiny_model(cli, seed: int = 0) -> Path:
    """A random tiny Qwen3 of ``cli.hidden`` / ``cli.layers`` / ``cli.vocab`` (untied) in a temporary folder."""
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tempfile.mkdtemp(), layers=cli.layers, hidden=cli.hidden, heads=4, kv_heads=2,
                           head_dim=cli.hidden // 4, ffn=3 * cli.hidden, vocab=cli.vocab, tied=False, seed=seed)


def random_rollout(batch: int, seq: int, vocab: int, top_k: int = 4) -> RolloutData:
    """``batch`` trajectories of ``seq`` label positions (prompt seq // 4 + 1 tokens, response the rest) with pi_old
    in [-6, -4], a sampler 0.2 nats off pi_old (a few versions behind) and teacher scores (label log-probs in
    [-8, 0], a top-``top_k`` of random ids)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab, (batch, seq + 1), generator=g)
    prompt, n = seq // 4 + 1, seq - seq // 4
    old = -torch.rand(batch, n, generator=g) * 2 - 4
    behavior = old + 0.2 * torch.randn(batch, n, generator=g)
    teacher = -torch.rand(batch, n, generator=g) * 8
    top_ids = torch.randint(vocab, (batch, n, top_k), generator=g)
    top = torch.log_softmax(torch.randn(batch, n, top_k, generator=g), -1).sort(-1, descending=True).values
    traj = TrajectoryBatch(prompt_ids=tokens[:, :prompt].tolist(), response_ids=tokens[:, prompt:].tolist(),
                           behavior_logprobs=behavior.tolist(), loss_mask=[[1] * n] * batch,
                           finish_reason=["length"] * batch, weight_version=["0"] * batch,
                           prompt_index=list(range(batch)))
    data = RolloutData(traj, TeacherScores(list(teacher), list(top_ids), list(top)))
    data.old_logprobs = dict(enumerate(old))
    return data


class FunctionTimer:
    """Wraps the functions ``names`` of ``megatron_bpd.train.loss`` to add up the seconds spent in them, under
    every name the train modules hold them by (``update`` imports ``m2po_batch_cutoff`` from ``loss``)."""

    def __init__(self, *names: str):
        from megatron_bpd.train import loss, update

        self.seconds = 0.0
        for name in names:
            timed = self._timed(getattr(loss, name))
            for module in (loss, update):
                if hasattr(module, name):
                    setattr(module, name, timed)

    def _timed(self, inner):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed


class TrainStep:
    """The trainer's update of the HF Qwen3 ``hf_dir`` (built as Megatron's local spec, Megatron DDP and
    optimizer) in micro-batches of ``micro_batch`` trajectories. ``update(loss_config)``: the ``Update`` itself;
    ``step(loss_config, data)`` -> seconds of one update on all of ``data`` from a fresh copy of the weights.
    Call ``parallel.initialize`` first."""

    def __init__(self, hf_dir, micro_batch: int, optimizer: str = "sgd", lr: float = 1e-3):
        from megatron_bpd.models.qwen3 import build_model
        from megatron_bpd.train.setup import OptimizerSettings, lr_scheduler, wrap_for_training

        self.hf_dir, self.micro_batch = hf_dir, micro_batch
        self.model = build_model(hf_dir, transformer_impl="local")
        self.settings = OptimizerSettings(optimizer=optimizer, lr=lr, clip_grad=0.0)
        self.ddp, self.optimizer = wrap_for_training(self.model, self.settings)
        self.scheduler = lr_scheduler(self.optimizer, self.settings, 1 << 30)

    def update(self, loss_config, teacher_model=None, overrides=()):
        """(``Update``, its ``ScoringPasses``) for ``loss_config`` and the ``TrainConfig`` ``overrides``
        (``key.sub=value``); ``teacher_model``: an in-trainer teacher."""
        from megatron_bpd.train.config import load_config
        from megatron_bpd.train.passes import ScoringPasses
        from megatron_bpd.train.rollout_data import MicroBatcher
        from megatron_bpd.train.update import Update

        config = load_config(None, [f"reuse.micro_batch_size={self.micro_batch}", *overrides])
        config = dataclasses.replace(config, loss=loss_config)
        batcher = MicroBatcher(loss_config.gate, self.micro_batch)
        passes = ScoringPasses(config, loss_config, self.ddp, teacher_model, batcher)
        return Update(config, loss_config, self.ddp, self.optimizer, self.scheduler, batcher, passes), passes

    def reload(self) -> None:
        from megatron_bpd.models.qwen3 import load_hf_weights

        load_hf_weights(self.model, self.hf_dir, progress=False)

    def step(self, loss_config, data: RolloutData) -> float:
        from megatron_bpd.train.metrics import MetricSums

        update, _ = self.update(loss_config)
        self.reload()
        start = time.perf_counter()
        update(data, list(range(len(data.trajectories))), MetricSums())
        return time.perf_counter() - start


def tiny_train_step(cli) -> TrainStep:
    """One process group of one (gloo), one thread, and a ``TrainStep`` of the tiny model in one micro-batch."""
    from megatron_bpd import parallel

    torch.set_num_threads(1)
    parallel.initialize(tp=1, seed=0)
    return TrainStep(tiny_model(cli), cli.batch)
