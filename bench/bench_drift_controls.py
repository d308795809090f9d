"""Benchmark each drift control's share of one training step: the same step (same model, same rollout, Block-64
gate, sampled-token loss on the fused head) with every ``loss.drift_control`` kind and with ``advantage_from:
current``, against the step without a control, measured side by side in one run.

The step is the trainer's update (``train_step.TrainStep``: a random tiny Qwen3, one process), m2po's batch cutoff
included. Each repeat runs every variant back to back on a fresh copy of the weights, in a rotated order; medians
and minima over ``--repeats``, and each variant's ratio to "none". The time spent inside the control's own functions
(its weights, penalty, metrics and m2po's cutoff) is measured in the same steps, as a share of the step: the A/B
ratio on a shared machine is noisier than that share. ``--smoke``: a tiny model and one repeat, in seconds (prints,
writes nothing).

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_drift_controls.py
"""

import argparse
import statistics

from train_step import FunctionTimer, add_arguments, random_rollout, tiny_train_step

from megatron_bpd import parallel
from megatron_bpd.drift_controls import DriftControlConfig
from megatron_bpd.gating import GateConfig

VARIANTS = {"none": {}, "token_drop": dict(drift_control=DriftControlConfig("token_drop")),
            "icepop": dict(drift_control=DriftControlConfig("icepop")),
            "tis": dict(drift_control=DriftControlConfig("tis")),
            "seq_mask": dict(drift_control=DriftControlConfig("seq_mask")),
            "m2po": dict(drift_control=DriftControlConfig("m2po")), "advantage_from current": dict(
                advantage_from="current")}
GATE = GateConfig(block_size=64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat: a check that it runs")
    cli = parser.parse_args(argv)
    if cli.smoke:
        cli.hidden, cli.layers, cli.vocab, cli.batch, cli.seq, cli.repeats = 32, 1, 512, 2, 128, 1
    from megatron_bpd.train import loss

    step = tiny_train_step(cli)
    data = random_rollout(cli.batch, cli.seq, cli.vocab)
    timer = FunctionTimer("drift_weights", "drift_penalty", "control_metrics", "m2po_batch_cutoff")
    times = {name: [] for name in VARIANTS}
    shares = {name: [] for name in VARIANTS}

    def run(name):
        timer.seconds = 0.0
        seconds = step.step(loss.LossConfig(gate=GATE, vocab_size=cli.vocab, **VARIANTS[name]), data)
        return seconds, timer.seconds

    names = list(VARIANTS)
    for name in names:  # warmup
        run(name)
    for r in range(cli.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, in_control = run(name)
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
