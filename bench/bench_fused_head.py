"""Benchmark the fused output-layer head against the unfused one: peak extra memory and time per token.

fused:   ``fused_linear_logprobs(hidden, weight, labels)`` (the logits recomputed per chunk, never held)
unfused: ``hidden @ weight^T`` (the column-parallel output layer: ``copy_to_tensor_model_parallel_region`` then the
         matmul) + megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy``
Both: forward + backward of the summed log-prob, float32 hidden ``[n, h]`` and weight shard ``[V/tp, h]``, the
gradients of both; TP ranks are gloo processes.

Memory: each (path, tokens, TP) runs in fresh processes; a rank's peak extra memory is its peak resident set
(``ru_maxrss``) minus its resident set just before the head runs (inputs allocated, libraries loaded): every byte
the head and its backward allocate, the weight gradient included (V/tp x h x 4 bytes in both paths). Reported: the
largest over ranks. Time: median over ``--repeats`` forward+backward calls after that first one, per token.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_fused_head.py
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _head(path, hidden, weight, labels, group, chunk):
    from megatron.core import tensor_parallel

    from megatron_bpd.vocab_parallel import fused_linear_logprobs

    if path == "fused":
        fused_linear_logprobs(hidden, weight, labels, group, chunk_tokens=chunk).sum().backward()
    else:
        logits = tensor_parallel.copy_to_tensor_model_parallel_region(hidden) @ weight.t()
        (-tensor_parallel.vocab_parallel_cross_entropy(logits, labels)).sum().backward()


def _rank(rank, tp, port, path, tokens, hidden_size, vocab, chunk, repeats, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from megatron_bpd import parallel

    parallel.initialize(tp=tp, seed=0)
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    weight = (torch.randn(vocab // tp, hidden_size, generator=gen) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    before = _rss_bytes()
    _head(path, hidden, weight, labels, group, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        torch.distributed.barrier()
        start = time.perf_counter()
        _head(path, hidden, weight, labels, group, chunk)
        times.append(time.perf_counter() - start)
    queue.put((rank, peak, statistics.median(times) if times else float("nan")))
    parallel.destroy()


def _worker(args):
    """One configuration in fresh processes: prints 'peak_bytes seconds'."""
    import torch.multiprocessing as mp

    from megatron_bpd.serve.launch import free_port

    path, tokens, tp, hidden_size, vocab, chunk, repeats = args
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, tp, port, path, tokens, hidden_size, vocab, chunk, repeats, queue))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    print(max(r[1] for r in results), max(r[2] for r in results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-tokens", type=int, default=16, help="fused chunk (positions per recomputed chunk)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--project", type=int, nargs="+", default=[2048, 8192, 32768],
                        help="token counts to project linearly from the measured ones")
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        path, *numbers = cli.worker
        return _worker([path, *map(int, numbers)])
    rows = {}
    for tp in cli.tp:
        for tokens in cli.tokens:
            for path in ("fused", "unfused"):
                args = [path, tokens, tp, cli.hidden, cli.vocab, cli.chunk_tokens, cli.repeats]
                out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], check=True,
                                     capture_output=True, text=True).stdout.split()
                rows[tp, tokens, path] = (int(out[-2]), float(out[-1]))
                print(tp, tokens, path, rows[tp, tokens, path], flush=True)
    mib = 2 ** 20
    print(f"\nV = {cli.vocab}, h = {cli.hidden}, float32, fused chunk {cli.chunk_tokens} tokens; peak extra memory "
          f"per rank (MiB, ru_maxrss) and time per token (ms, median of {cli.repeats})")
    print("| TP | tokens | fused MiB | unfused MiB | fused ms/token | unfused ms/token | fused/unfused time |")
    print("|---|---|---|---|---|---|---|")
    for (tp, tokens, path), _ in rows.items():
        if path != "fused":
            continue
        (fm, ft), (um, ut) = rows[tp, tokens, "fused"], rows[tp, tokens, "unfused"]
        print(f"| {tp} | {tokens} | {fm / mib:.0f} | {um / mib:.0f} | {1e3 * ft / tokens:.1f} | "
              f"{1e3 * ut / tokens:.1f} | {ft / ut:.2f}x |")
    lo, hi = min(cli.tokens), max(cli.tokens)
    print("\nProjected, not measured: unfused linear through the two measured sizes; fused the largest measured plus "
          "its only per-token buffer, the float32 hidden gradient [n, h] (also part of the unfused slope):")
    print("| TP | tokens | fused MiB | unfused MiB | unfused: float32 logits + their grad alone |")
    print("|---|---|---|---|---|")
    for tp in cli.tp:
        for tokens in cli.project:
            fused = max(rows[tp, t, "fused"][0] for t in cli.tokens) + (tokens - hi) * cli.hidden * 4
            a, b = rows[tp, lo, "unfused"][0], rows[tp, hi, "unfused"][0]
            unfused = a + (b - a) * (tokens - lo) / (hi - lo)
            logits = 2 * tokens * (cli.vocab // tp) * 4
            print(f"| {tp} | {tokens} | {fused / mib:.0f} | {unfused / mib:.0f} | {logits / mib:.0f} |")


if __name__ == "__main__":
    main()
