"""Benchmark the gate's share of one training step: the same step (same model, same rollout) with the Block-64
gate and with granularity "none" (the ungated baseline), plus the time spent inside ``gates_for_segments``.

One process (TP 1), a random tiny Qwen3 (``--hidden``, ``--layers``, ``--vocab``), ``--batch`` sequences of
``--seq`` tokens (the first quarter prompt), sampled-token loss, SGD; the step is Megatron's
forward_backward_func + optimizer step, as in the trainer. Each repeat runs the gated and the ungated step back to
back on a fresh copy of the weights; medians and minima over ``--repeats``.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_gate_step.py
"""

import argparse
import statistics
import tempfile
import time

import torch

from megatron_bpd.gating import GateConfig, plan_segments


def _data(batch, seq, vocab):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab, (batch, seq + 1), generator=g)
    starts = torch.full((batch,), seq // 4)
    mask = torch.arange(seq)[None] >= starts[:, None]
    old = -torch.rand(batch, seq, generator=g) * 2 - 4
    teacher = -torch.rand(batch, seq, generator=g) * 8
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], starts=starts, mask=mask, old=old, teacher=teacher)


def _micro_batch(data, gate):
    from megatron_bpd.train.batch import MicroBatch

    plan = plan_segments(data["mask"].shape, gate, response_starts=data["starts"])
    return MicroBatch(tokens=data["tokens"], labels=data["labels"], loss_mask=data["mask"], old_logprobs=data["old"],
                      segment_ids=plan.segment_ids, plan=plan, teacher_logprobs=data["teacher"])


class _GateTimer:
    """Wraps train.loss.gates_for_segments to add up the seconds spent in it."""

    def __init__(self):
        from megatron_bpd.train import loss

        self.module, self.inner, self.seconds = loss, loss.gates_for_segments, 0.0
        loss.gates_for_segments = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd import parallel
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.models.tiny import make_tiny_qwen3
    from megatron_bpd.train.forward_step import make_forward_step
    from megatron_bpd.train.loss import LossConfig
    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training, zero_grads

    parallel.initialize(tp=1, seed=0)
    hf_dir = make_tiny_qwen3(tempfile.mkdtemp(), layers=cli.layers, hidden=cli.hidden, heads=4, kv_heads=2,
                             head_dim=cli.hidden // 4, ffn=3 * cli.hidden, vocab=cli.vocab, tied=False)
    model = build_model(hf_dir, transformer_impl="local")
    ddp_model, optimizer = wrap_for_training(model, OptimizerSettings(optimizer="sgd", lr=1e-3, clip_grad=0.0))
    data = _data(cli.batch, cli.seq, cli.vocab)
    timer = _GateTimer()
    gates = {"block64": GateConfig(block_size=64), "none": GateConfig(granularity="none")}
    times = {name: [] for name in gates}
    gate_seconds = {name: [] for name in gates}

    def step(gate):
        load_hf_weights(model, hf_dir, progress=False)
        zero_grads(ddp_model, optimizer)
        batch = _micro_batch(data, gate)
        forward_step = make_forward_step(LossConfig(gate=gate, vocab_size=cli.vocab), data["mask"].sum(), 1)
        timer.seconds = 0.0
        start = time.perf_counter()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp_model],
                                    num_microbatches=1, seq_length=cli.seq, micro_batch_size=cli.batch,
                                    forward_only=False)
        optimizer.step()
        return time.perf_counter() - start, timer.seconds

    for name, gate in gates.items():  # warmup
        step(gate)
    for _ in range(cli.repeats):
        for name, gate in gates.items():
            seconds, in_gate = step(gate)
            times[name].append(seconds)
            gate_seconds[name].append(in_gate)
    print(f"tiny Qwen3 hidden {cli.hidden}, {cli.layers} layers, vocab {cli.vocab}; {cli.batch} x {cli.seq} tokens; "
          f"{cli.repeats} repeats")
    print("| gate | step s (median) | step s (min) | in gates_for_segments ms (median) |")
    print("|---|---|---|---|")
    for name in gates:
        print(f"| {name} | {statistics.median(times[name]):.3f} | {min(times[name]):.3f} | "
              f"{1e3 * statistics.median(gate_seconds[name]):.2f} |")
    ratio = statistics.median(times["block64"]) / statistics.median(times["none"])
    ratio_min = min(times["block64"]) / min(times["none"])
    share = statistics.median([s / t for s, t in zip(gate_seconds["block64"], times["block64"])])
    print(f"\nblock64 / none: {ratio:.3f}x (medians), {ratio_min:.3f}x (minima); "
          f"gates_for_segments is {100 * share:.2f}% of the gated step")
    parallel.destroy()


if __name__ == "__main__":
    main()
