"""Benchmark the fused output-layer head against the unfused one: peak extra memory and time per token.

Two heads (``--heads``), each fused and unfused; float32 hidden ``[n, h]`` and weight shard ``[V/tp, h]``, forward +
backward with the gradients of both; TP ranks are gloo processes.

- ``logprobs``: fused ``LMHead.of_hidden(hidden, weight).logprobs(labels)`` (the logits recomputed per chunk in
  the backward, never held); unfused ``hidden @ weight^T`` (the column-parallel output layer:
  ``copy_to_tensor_model_parallel_region`` then the matmul) + megatron-core's
  ``tensor_parallel.vocab_parallel_cross_entropy``. Backward of the summed log-prob. The trainer's head for the
  sampled-token loss where its gradient cannot be taken in the forward (context parallelism, per-sequence gates).
- ``sampled_token`` (the trainer's sampled-token head): the PPO loss of the sampled tokens
  (``losses.ppo_losses``, fixed old and teacher log-probs) summed and back-propagated. Fused: ``LMHead.token_loss``
  (the gradient taken in the forward, 3 GEMMs); unfused: the output layer + megatron's cross entropy + the same
  loss.
- ``lsm`` (the trainer's Teacher-TopK/LSM head): the log-probs of the sampled tokens for the gate (no gradient flows
  through them) and the LSM loss on a K = 32 support, back-propagated: ``LMHead.logprobs`` + ``LMHead.lsm_loss``,
  fused over the hidden states (the gradient flows through the K gathered logits only) or, unfused, over the output
  layer's logits.

Memory: each (path, tokens, TP) runs in fresh processes; a rank's peak extra memory is its peak resident set
(``ru_maxrss``) minus its resident set just before the head runs (inputs allocated, libraries loaded): every byte
the head and its backward allocate, the weight gradient included (V/tp x h x 4 bytes in both paths). Reported: the
largest over ranks. Time: median over ``--repeats`` forward+backward calls after that first one, per token
(``--repeats 0``: the first call's time, page faults of its allocations included).

    OMP_NUM_THREADS=1 taskset -c 1 python bench/bench_fused_head.py
    python bench/bench_fused_head.py --tokens 2048 8192 --tp 1 2 --heads logprobs lsm --repeats 0
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from queue import Empty

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SUPPORT = 32  # the LSM head's teacher top-K


def _head(head, path, hidden, weight, labels, support, group, chunk):
    from megatron.core import tensor_parallel

    from megatron_bpd.losses import ppo_losses, ppo_terms
    from megatron_bpd.vocab_parallel import LMHead

    mask = torch.ones_like(labels, dtype=torch.bool)
    teacher = torch.log_softmax(torch.linspace(0, -8, SUPPORT), 0).expand(*labels.shape, SUPPORT)
    old = torch.full(labels.shape, -12.0)  # the behavior log-probs: the PPO ratio stays inside its clip
    ppo = lambda lp, part=slice(None): ppo_losses(ppo_terms(lp, old[part], old[part] + 1.0,  # noqa: E731
                                                            mask[part])).sum()
    if path == "fused":
        lm_head = LMHead.of_hidden(hidden, weight, group, chunk_tokens=chunk or None)
        if head == "sampled_token":
            lm_head.token_loss(labels, lambda part, lp: ppo(lp, part))[0].backward()
            return
    else:
        logits = tensor_parallel.copy_to_tensor_model_parallel_region(hidden) @ weight.t()
        if head != "lsm":
            cross_entropy = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
            (-cross_entropy.sum() if head == "logprobs" else ppo(-cross_entropy)).backward()
            return
        lm_head = LMHead.of_logits(logits, group)
    lp = lm_head.logprobs(labels)
    if head == "logprobs":
        lp.sum().backward()
    else:
        lm_head.lsm_loss(support, teacher, mask, gates=lp.detach())[0].backward()


def _rank(rank, tp, port, head, path, tokens, hidden_size, vocab, chunk, repeats, queue):
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
    support = torch.randint(0, vocab, (tokens, SUPPORT), generator=gen)
    before = _rss_bytes()
    if tp > 1:
        torch.distributed.barrier()
    start = time.perf_counter()
    _head(head, path, hidden, weight, labels, support, group, chunk)
    times = [time.perf_counter() - start]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        torch.distributed.barrier()
        start = time.perf_counter()
        _head(head, path, hidden, weight, labels, support, group, chunk)
        times.append(time.perf_counter() - start)
    queue.put((rank, peak, statistics.median(times[1:] if repeats else times)))
    parallel.destroy()


def _worker(args):
    """One configuration in fresh processes: prints 'peak_bytes seconds'."""
    import torch.multiprocessing as mp

    from megatron_bpd.rollout.embedded import free_port

    head, path, tokens, tp, hidden_size, vocab, chunk, repeats = args
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, tp, port, head, path, tokens, hidden_size, vocab, chunk, repeats,
                                             queue))
             for r in range(tp)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=5))
        except Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"a rank of {head}/{path} at {tokens} tokens, TP {tp} failed (exit codes {failed})")
    for p in procs:
        p.join()
    print(max(r[1] for r in results), max(r[2] for r in results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="fused chunk (positions per chunk; 0: the library's default, 128 MiB of logits)")
    parser.add_argument("--heads", nargs="+", choices=("logprobs", "sampled_token", "lsm"), default=["logprobs"])
    parser.add_argument("--paths", nargs="+", choices=("fused", "unfused"), default=["fused", "unfused"],
                        help="unfused alone where the fused one is measured elsewhere; fused alone where the unfused "
                             "logits do not fit in memory")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--project", type=int, nargs="+", default=[2048, 8192, 32768],
                        help="token counts to project linearly from the measured ones")
    parser.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.worker:
        head, path, *numbers = cli.worker
        return _worker([head, path, *map(int, numbers)])
    rows = {}
    for head in cli.heads:
        for tp in cli.tp:
            for tokens in cli.tokens:
                for path in cli.paths:
                    args = [head, path, tokens, tp, cli.hidden, cli.vocab, cli.chunk_tokens, cli.repeats]
                    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], check=True,
                                         capture_output=True, text=True).stdout.split()
                    rows[head, tp, tokens, path] = (int(out[-2]), float(out[-1]))
                    print(head, tp, tokens, path, rows[head, tp, tokens, path], flush=True)
    mib = 2 ** 20
    timing = f"median of {cli.repeats} after the first call" if cli.repeats else "one call"
    chunk = f"{cli.chunk_tokens} tokens" if cli.chunk_tokens else "the default (128 MiB of logits)"
    print(f"\nV = {cli.vocab}, h = {cli.hidden}, float32, fused chunk {chunk}; peak extra memory "
          f"per rank (MiB, ru_maxrss) and time per token (ms, {timing})")
    print("| head | TP | tokens | fused MiB | unfused MiB | fused ms/token | unfused ms/token | fused/unfused time |")
    print("|---|---|---|---|---|---|---|---|")
    for head, tp, tokens in dict.fromkeys(key[:3] for key in rows):
        fused, unfused = rows.get((head, tp, tokens, "fused")), rows.get((head, tp, tokens, "unfused"))
        mem = lambda r: "-" if r is None else f"{r[0] / mib:.0f}"  # noqa: E731
        ms = lambda r: "-" if r is None else f"{1e3 * r[1] / tokens:.2f}"  # noqa: E731 (pylint: cell-var-from-loop)
        ratio = f"{fused[1] / unfused[1]:.2f}x" if fused and unfused else "-"
        print(f"| {head} | {tp} | {tokens} | {mem(fused)} | {mem(unfused)} | {ms(fused)} | {ms(unfused)} | {ratio} |")
    if len(cli.paths) < 2 or len(cli.tokens) < 2:
        return
    head, lo, hi = cli.heads[0], min(cli.tokens), max(cli.tokens)
    print("\nProjected, not measured: unfused linear through the two measured sizes; fused the largest measured plus "
          "its only per-token buffer, the float32 hidden gradient [n, h] (also part of the unfused slope):")
    print("| TP | tokens | fused MiB | unfused MiB | unfused: float32 logits + their grad alone |")
    print("|---|---|---|---|---|")
    for tp in cli.tp:
        for tokens in cli.project:
            fused = max(rows[head, tp, t, "fused"][0] for t in cli.tokens) + (tokens - hi) * cli.hidden * 4
            a, b = rows[head, tp, lo, "unfused"][0], rows[head, tp, hi, "unfused"][0]
            unfused = a + (b - a) * (tokens - lo) / (hi - lo)
            logits = 2 * tokens * (cli.vocab // tp) * 4
            print(f"| {tp} | {tokens} | {fused / mib:.0f} | {unfused / mib:.0f} | {logits / mib:.0f} |")


if __name__ == "__main__":
    main()
