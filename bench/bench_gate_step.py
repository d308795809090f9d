"""Benchmark the gate's share of one training step: the same step (same model, same rollout) with the Block-64
gate and with granularity "none" (the ungated baseline), plus the time spent inside ``gates_for_segments``.

One process (TP 1), a random tiny Qwen3 (``--hidden``, ``--layers``, ``--vocab``), ``--batch`` sequences of
``--seq`` tokens (the first quarter prompt), sampled-token loss, SGD; the step is the trainer's update
(``train_step.TrainStep``: the loss's pre-pass, Megatron's forward_backward_func, the optimizer step). Each repeat
runs the gated and the ungated step back to back on a fresh copy of the weights; medians and minima over
``--repeats``.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_gate_step.py
"""

import argparse
import statistics

from train_step import FunctionTimer, add_arguments, random_rollout, tiny_train_step

from megatron_bpd import parallel

from megatron_bpd.gating import GateConfig
from megatron_bpd.train.loss import LossConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    cli = parser.parse_args()
    step = tiny_train_step(cli)
    data = random_rollout(cli.batch, cli.seq, cli.vocab)
    timer = FunctionTimer("gates_for_segments")
    gates = {"block64": GateConfig(block_size=64), "none": GateConfig(granularity="none")}
    times = {name: [] for name in gates}
    gate_seconds = {name: [] for name in gates}

    def run(name):
        timer.seconds = 0.0
        seconds = step.step(LossConfig(gate=gates[name], vocab_size=cli.vocab), data)
        return seconds, timer.seconds

    for name in gates:  # warmup
        run(name)
    for _ in range(cli.repeats):
        for name in gates:
            seconds, in_gate = run(name)
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
