"""Peak memory of one whole trainer step against the number of tokens, with the LM head fused or not (issue 25).

A step as the trainer runs it, on one process (TP 1), with the trainer's own phases: the student's old log-probs
recomputed (``ScoringPasses.old_logprobs``), an in-trainer teacher's scores
(``ScoringPasses.megatron_teacher_scores``: top-32 and the labels' log-probs in one pass), then one update
(``update.Update``: the sampled-token OPD loss with the Block-16 gate, under Megatron's forward_backward_func; SGD).
Student and teacher are tiny Qwen3 models (``--layers``, ``--hidden``, untied embeddings) with Qwen3's vocabulary V
= 151,936, so that the LM head dominates; the step's batch is one micro-batch of ``--tokens`` positions (sequences
of ``--seq``). ``fused`` (``loss.fused_head: true``, the default): every pass reads the ``LMHead`` from the final
hidden states and the output weight; ``unfused``: from the logits ``[tokens, V]``, which the passes hold (float32:
0.58 MiB per token).

Memory: each (path, tokens) runs in a fresh process. Before each pass the peak resident set is reset to the
current one (Linux VmHWM through /proc/self/clear_refs; glibc mmaps every allocation of 64 KiB or more, so freed
tensors leave the resident set at once); a pass's peak is its VmHWM minus the resident set before the step (models,
SGD optimizer, gradient buffers and batch built): what the step adds. The step's peak is the largest of its passes.
Unfused runs whose logits alone exceed ``--max-logits-gib`` are not run.

    OMP_NUM_THREADS=1 python bench/bench_step_memory.py --tokens 2048 8192 32768
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from bench_vocab_parallel import HostPeak, _status_kib
from train_step import TrainStep, random_rollout, tiny_model

PATHS = ("fused", "unfused")
TOP_K = 32


def child(path: str, tokens: int, cli) -> dict:
    """One step of ``path`` at ``tokens`` in this process: peak MiB and seconds of each pass."""
    from megatron_bpd import parallel
    from megatron_bpd.gating import GateConfig
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.train.loss import LossConfig
    from megatron_bpd.train.metrics import MetricSums

    torch.set_num_threads(1)
    parallel.initialize(tp=1, seed=0)
    data = random_rollout(tokens // cli.seq, cli.seq, cli.vocab, top_k=TOP_K)
    student = TrainStep(tiny_model(cli, seed=0), len(data.trajectories))
    student.reload()
    teacher_dir = tiny_model(cli, seed=1)
    teacher = build_model(teacher_dir, transformer_impl="local")
    load_hf_weights(teacher, teacher_dir, progress=False)
    config = LossConfig(gate=GateConfig(block_size=16), vocab_size=cli.vocab, fused_head=path == "fused")
    update, passes = student.update(config, teacher.eval(), [f"teacher.top_k={TOP_K}", "reuse.old_logprobs=recompute"])
    rows = list(range(len(data.trajectories)))
    steps = {"recompute": lambda: passes.old_logprobs(data, MetricSums(), 0),
             "teacher": lambda: passes.megatron_teacher_scores(data),
             "train": lambda: update(data, rows, MetricSums())}
    base, peak, out = _status_kib("VmRSS"), HostPeak(), {}
    for name, run in steps.items():
        peak.reset()
        start = time.perf_counter()
        run()
        out[name] = dict(seconds=time.perf_counter() - start, mib=(_status_kib("VmHWM") - base) / 1024)
    parallel.destroy()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--max-logits-gib", type=float, default=8.0)
    parser.add_argument("--smoke", action="store_true", help="64 tokens, V = 4096, h = 32")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    if cli.smoke:
        cli.tokens, cli.vocab, cli.hidden, cli.seq = [64], 4096, 32, 32
    if cli.child:
        print(json.dumps(child(cli.child[0], int(cli.child[1]), cli)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    forwarded = ["--hidden", str(cli.hidden), "--layers", str(cli.layers), "--vocab", str(cli.vocab),
                 "--seq", str(cli.seq)]
    print(f"V = {cli.vocab}, h = {cli.hidden}, {cli.layers} layer(s), sequences of {cli.seq}, TP 1, float32; "
          "MiB added by the step to the resident set")
    print("| path | tokens | recompute MiB | teacher MiB | train MiB | step peak MiB | step s |")
    print("|---|---|---|---|---|---|---|")
    for path in cli.paths:
        for tokens in cli.tokens:
            logits_gib = tokens * cli.vocab * 4 / 2**30
            if path == "unfused" and logits_gib > cli.max_logits_gib:
                print(f"| {path} | {tokens} | not run: the logits alone are {logits_gib:.1f} GiB | | | | |")
                continue
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, str(tokens),
                                   *forwarded], env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{path} at {tokens} tokens failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {path} | {tokens} | {r['recompute']['mib']:.0f} | {r['teacher']['mib']:.0f} | "
                  f"{r['train']['mib']:.0f} | {max(p['mib'] for p in r.values()):.0f} | "
                  f"{sum(p['seconds'] for p in r.values()):.1f} |", flush=True)


if __name__ == "__main__":
    main()
