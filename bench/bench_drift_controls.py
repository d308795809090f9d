"""Benchmark each drift control's share of one training step: the same step (same model, same rollout, Block-64
gate, sampled-token loss on the fused head) with every ``loss.drift_control`` kind and with ``advantage_from:
current``, against the step without a control, measured side by side in one run.

One process (TP 1), a random tiny Qwen3 (``--hidden``, ``--layers``, ``--vocab``), ``--batch`` sequences of
``--seq`` tokens (the first quarter prompt), SGD; the step is what the trainer's update runs: m2po's batch cutoff
(``m2po_batch_cutoff``), Megatron's forward_backward_func and the optimizer step. Each repeat runs every variant
back to back on a fresh copy of the weights, in a rotated order; medians and minima over ``--repeats``, and each
variant's ratio to "none". The time spent inside the control's own functions (its weights, penalty, metrics and
m2po's cutoff) is measured in the same steps, as a share of the step: the A/B ratio on a shared machine is noisier
than that share. ``--smoke``: a tiny model and one repeat, in seconds (prints, writes nothing).

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_drift_controls.py
"""

import argparse
import statistics
import tempfile
import time

import torch

from megatron_bpd.drift_controls import DriftControlConfig
from megatron_bpd.gating import GateConfig, plan_segments

VARIANTS = {"none": {}, "token_drop": dict(drift_control=DriftControlConfig("token_drop")),
            "icepop": dict(drift_control=DriftControlConfig("icepop")),
            "tis": dict(drift_control=DriftControlConfig("tis")),
            "seq_mask": dict(drift_control=DriftControlConfig("seq_mask")),
            "m2po": dict(drift_control=DriftControlConfig("m2po")), "advantage_from current": dict(
                advantage_from="current")}
GATE = GateConfig(block_size=64)


def _micro_batch(batch, seq, vocab):
    from megatron_bpd.train.batch import MicroBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab, (batch, seq + 1), generator=g)
    starts = torch.full((batch,), seq // 4)
    mask = torch.arange(seq)[None] >= starts[:, None]
    old = -torch.rand(batch, seq, generator=g) * 2 - 4
    behavior = old + 0.2 * torch.randn(batch, seq, generator=g)  # a sampler a few versions behind: controls bind
    plan = plan_segments(mask.shape, GATE, response_starts=starts)
    return MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask, old_logprobs=old,
                      segment_ids=plan.segment_ids, plan=plan, behavior_logprobs=behavior,
                      teacher_logprobs=-torch.rand(batch, seq, generator=g) * 8)


class _ControlTimer:
    """Wraps the drift-control functions that ``train.loss`` calls to add up the seconds spent in them."""

    NAMES = ("drift_weights", "drift_penalty", "control_metrics", "m2po_batch_cutoff")

    def __init__(self):
        from megatron_bpd.train import loss

        self.seconds = 0.0
        for name in self.NAMES:
            setattr(loss, name, self.wrap(getattr(loss, name)))

    def wrap(self, inner):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out
        return timed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat: a check that it runs")
    cli = parser.parse_args(argv)
    if cli.smoke:
        cli.hidden, cli.layers, cli.vocab, cli.batch, cli.seq, cli.repeats = 32, 1, 512, 2, 128, 1
    torch.set_num_threads(1)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_bpd import parallel
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.models.tiny import make_tiny_qwen3
    from megatron_bpd.train import loss
    from megatron_bpd.train.forward_step import make_forward_step
    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training, zero_grads

    parallel.initialize(tp=1, seed=0)
    hf_dir = make_tiny_qwen3(tempfile.mkdtemp(), layers=cli.layers, hidden=cli.hidden, heads=4, kv_heads=2,
                             head_dim=cli.hidden // 4, ffn=3 * cli.hidden, vocab=cli.vocab, tied=False)
    model = build_model(hf_dir, transformer_impl="local")
    ddp_model, optimizer = wrap_for_training(model, OptimizerSettings(optimizer="sgd", lr=1e-3, clip_grad=0.0))
    batch = _micro_batch(cli.batch, cli.seq, cli.vocab)
    times = {name: [] for name in VARIANTS}
    shares = {name: [] for name in VARIANTS}
    timer = _ControlTimer()

    def step(options):
        config = loss.LossConfig(gate=GATE, vocab_size=cli.vocab, **options)
        load_hf_weights(model, hf_dir, progress=False)
        zero_grads(ddp_model, optimizer)
        timer.seconds = 0.0
        start = time.perf_counter()
        cutoff = loss.m2po_batch_cutoff([batch], config.drift_control) if config.drift_control.kind == "m2po" else None
        forward_step = make_forward_step(config, batch.num_tokens, 1, m2_cutoff=cutoff)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp_model],
                                    num_microbatches=1, seq_length=cli.seq, micro_batch_size=cli.batch,
                                    forward_only=False)
        optimizer.step()
        return time.perf_counter() - start, timer.seconds

    names = list(VARIANTS)
    for name in names:  # warmup
        step(VARIANTS[name])
    for r in range(cli.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, in_control = step(VARIANTS[name])
            times[name].append(seconds)
            shares[name].append(in_control / seconds)
    print(f"tiny Qwen3 hidden {cli.hidden}, {cli.layers} layers, vocab {cli.vocab}; {cli.batch} x {cli.seq} tokens; "
          f"Block-64 gate, sampled-token loss, fused head; {cli.repeats} repeats")
    print("| variant | step s (median) | step s (min) | / none (medians) | / none (minima) | in the control (median) |")
    print("|---|---|---|---|---|---|")
    base_median, base_min = statistics.median(times["none"]), min(times["none"])
    for name in names:
        median, fastest = statistics.median(times[name]), min(times[name])
        print(f"| {name} | {median:.3f} | {fastest:.3f} | {median / base_median:.3f}x | {fastest / base_min:.3f}x | "
              f"{100 * statistics.median(shares[name]):.2f}% |")
    parallel.destroy()


if __name__ == "__main__":
    main()
