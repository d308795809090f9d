"""Peak extra memory, time and communication of the vocab-parallel ops against the naive path and megatron-core.

    OMP_NUM_THREADS=1 python bench/bench_vocab_parallel.py [--configs V:TOKENS:TP ...] [--repeats 2]
    python bench/bench_vocab_parallel.py --device cuda --configs 151936:4096:1 [--json rows.json]

TP ranks are gloo processes on this machine (one core each at TP 2 on a 2-core box). The default configs keep the
naive path within ~10 GiB of RAM (V=151936 at TP 2 with 2048 tokens). Per (V, tokens, TP) it runs,
on float32 logits [n, V/tp] (fp32: what GPTModel's output layer gives here):
  logprobs_at (one id)  fwd+bwd: ours (LMHead.of_logits(x).logprobs) | megatron vocab_parallel_cross_entropy |
                                 naive (all-gather V, log_softmax)
  topk (K=32)           fwd:     ours (LMHead.topk) | naive (all-gather V, log_softmax, topk)
  LSM loss (K=32)       fwd+bwd: ours (LMHead.lsm_loss: logits_at + losses.topk_lsm_loss) | naive (all-gather V,
                                 gather, same loss)

With --device cuda each TP rank is a process on its own GPU (NCCL), and memory is the CUDA caching allocator's peak
allocation during the op minus its allocation before it (torch.cuda.max_memory_allocated); otherwise:
Memory: the peak resident set of the process during the op minus the resident set just before it (Linux VmHWM,
reset through /proc/self/clear_refs before each run; glibc is told to mmap every allocation of 64 KiB or more,
so freed tensors leave the resident set at once and new ones enter it); the inputs exist before, the gradient wrt the logits shard
[n, V/tp] is created during the op and counted (every path must produce it). Megatron's CE computes in place in its
input (a float32 input becomes the softmax, then its own gradient): its input is a copy made before the
measurement, as the output layer's logits would be. Max over ranks.
Time: best of --repeats runs (the paths interleaved), each ending with a barrier (the slowest rank).
Communication: payload bytes of the collectives the op issues (all-gather output, all-reduce tensor) per position,
counted by wrapping torch.distributed's collectives.
"""

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from distributed import run_distributed  # noqa: E402

K = 32


# ----------------------------------------------------------------------------------------- measuring
def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


class CommCounter:
    """Counts payload bytes of all_gather_into_tensor (output) and all_reduce (tensor), also through megatron's
    bound all-gather function."""

    def __init__(self):
        from megatron.core.tensor_parallel import mappings

        self.bytes = 0
        for owner, name in ((dist, "all_gather_into_tensor"), (dist, "all_reduce"),
                            (mappings, "dist_all_gather_func")):
            setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, fn):
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return fn(tensor, *args, **kwargs)
        return counted


class HostPeak:
    """Peak extra resident set (MiB) of this process since ``reset``: Linux VmHWM."""

    def reset(self):
        self.base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set

    def read(self):
        return (_status_kib("VmHWM") - self.base) / 1024


class CudaPeak:
    """Peak extra CUDA allocation (MiB) since ``reset``, from torch's caching allocator; ``read`` synchronizes."""

    def reset(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def read(self):
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2**20


def measure_once(fn, make_inputs, comm, peak):
    """(seconds, peak extra MiB, comm bytes) of one fn(*make_inputs()), ended by a barrier."""
    inputs = make_inputs()
    gc.collect()
    dist.barrier()
    peak.reset()
    comm.bytes = 0
    start = time.perf_counter()
    fn(*inputs)
    mib = peak.read()
    dist.barrier()
    seconds = time.perf_counter() - start
    return seconds, mib, comm.bytes


# ------------------------------------------------------------------------------------------------ ops
def _full(x):
    from megatron.core import tensor_parallel

    return tensor_parallel.gather_from_tensor_model_parallel_region(x)


def ours_logprobs(x, ids, w, group):
    from megatron_bpd.vocab_parallel import LMHead

    (LMHead.of_logits(x, group).logprobs(ids) * w).sum().backward()


def megatron_ce(x, ids, w, group):
    from megatron.core import tensor_parallel

    (-tensor_parallel.vocab_parallel_cross_entropy(x, ids) * w).sum().backward()


def naive_logprobs(x, ids, w, group):
    lp = F.log_softmax(_full(x).float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (lp * w).sum().backward()


def ours_topk(x, group):
    from megatron_bpd.vocab_parallel import LMHead

    LMHead.of_logits(x, group).topk(K)


@torch.no_grad()
def naive_topk(x, group):
    F.log_softmax(_full(x).float(), -1).topk(K, -1)


def ours_lsm(x, support, teacher, mask, group):
    from megatron_bpd.vocab_parallel import LMHead

    LMHead.of_logits(x, group).lsm_loss(support, teacher, mask)[0].backward()


def naive_lsm(x, support, teacher, mask, group):
    from megatron_bpd.losses import topk_lsm_loss

    topk_lsm_loss(_full(x).gather(-1, support), teacher, mask)[0].backward()


# ------------------------------------------------------------------------------------------- workers
def _bench(rank, world_size, configs, repeats):
    from megatron.core import parallel_state

    from megatron_bpd import parallel

    torch.set_num_threads(1)
    parallel.initialize(tp=world_size, seed=0)
    device = parallel.compute_device()  # NCCL and this rank's GPU where CUDA is available, else gloo and the CPU
    peak = CudaPeak() if device.type == "cuda" else HostPeak()
    group = parallel_state.get_tensor_model_parallel_group()
    comm = CommCounter()
    rows = []
    for vocab, n in configs:
        local = vocab // world_size
        gen = torch.Generator().manual_seed(rank)
        logits = (torch.randn(n, local, generator=gen) * 3).to(device)
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1)).to(device)
        support = torch.randint(0, vocab, (n, K), generator=torch.Generator().manual_seed(2)).to(device)
        teacher = torch.log_softmax(torch.randn(n, K, generator=torch.Generator().manual_seed(3)), -1).to(device)
        mask, w = torch.ones(n, device=device), torch.randn(n, generator=torch.Generator().manual_seed(4)).to(device)

        def leaf():
            return logits.detach().requires_grad_()

        def copy():
            return logits.detach().clone().requires_grad_()  # megatron's CE overwrites its input

        cases = [
            ("logprobs_at", "ours", ours_logprobs, lambda: (leaf(), ids, w, group)),
            ("logprobs_at", "megatron CE", megatron_ce, lambda: (copy(), ids, w, group)),
            ("logprobs_at", "naive", naive_logprobs, lambda: (leaf(), ids, w, group)),
            ("topk", "ours", ours_topk, lambda: (logits, group)),
            ("topk", "naive", naive_topk, lambda: (logits, group)),
            ("LSM loss", "ours", ours_lsm, lambda: (leaf(), support, teacher, mask, group)),
            ("LSM loss", "naive", naive_lsm, lambda: (leaf(), support, teacher, mask, group)),
        ]
        best = {}
        for _ in range(repeats):  # paths interleaved, so that a load burst on the shared machine hits all of them
            for op, path, fn, make in cases:
                seconds, mib, sent = measure_once(fn, make, comm, peak)
                prev = best.get((op, path), (float("inf"), 0.0, 0))
                best[(op, path)] = (min(prev[0], seconds), max(prev[1], mib), sent)
        for (op, path), (seconds, mib, sent) in best.items():
            grad_mib = 0.0 if op == "topk" else n * local * 4 / 2**20  # the float32 logits grad it returns
            rows.append(dict(vocab=vocab, n=n, tp=world_size, op=op, path=path, seconds=seconds, mib=mib,
                             grad_mib=grad_mib, comm_per_pos=sent / n, device=str(device)))
        del logits
        gc.collect()
    parallel.destroy()
    return rows


def _merge_ranks(per_rank):
    """Max over ranks of time and memory (the comm payload is the same on every rank)."""
    merged = []
    for rows in zip(*per_rank):
        row = dict(rows[0])
        row["seconds"] = max(r["seconds"] for r in rows)
        row["mib"] = max(r["mib"] for r in rows)
        merged.append(row)
    return merged


def _table(rows):
    ref = {(r["vocab"], r["n"], r["tp"], r["op"], r["path"]): r for r in rows}
    lines = ["| V | tokens | TP | op | path | time s | x megatron CE | peak extra MiB | x naive | "
             "beyond the logits grad MiB | x naive | comm B/pos |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["vocab"], r["n"], r["tp"], r["op"])
        naive, meg = ref.get(key + ("naive",)), ref.get(key + ("megatron CE",))
        vs_meg = f"{r['seconds'] / meg['seconds']:.2f}" if meg else ""
        beyond = max(r["mib"] - r["grad_mib"], 0.0)
        naive_beyond = max(naive["mib"] - naive["grad_mib"], 0.0) if naive else 0.0
        vs_naive = f"{r['mib'] / naive['mib']:.2f}" if naive and naive["mib"] > 0 else ""
        vs_naive_beyond = f"{beyond / naive_beyond:.3f}" if naive_beyond >= 64 else "-"  # naive: ~only its grad
        lines.append(f"| {r['vocab']} | {r['n']} | {r['tp']} | {r['op']} | {r['path']} | {r['seconds']:.3f} | "
                     f"{vs_meg} | {r['mib']:.0f} | {vs_naive} | {beyond:.0f} | {vs_naive_beyond} | "
                     f"{r['comm_per_pos']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["151936:4096:1", "8192:32768:1", "151936:2048:2",
                                                          "8192:16384:2"], help="vocab:tokens:tp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: one GPU per TP rank over NCCL (the ranks select CUDA whenever it is available)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    args = parser.parse_args()
    if (args.device == "cuda") != torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {'sees no' if args.device == 'cuda' else 'sees a'} CUDA "
                         "device, and the ranks run on CUDA exactly when one is visible (CUDA_VISIBLE_DEVICES='' "
                         "hides it)")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc in the spawned ranks (see the docstring)
    by_tp = {}
    for config in args.configs:
        vocab, tokens, tp = (int(part) for part in config.split(":"))
        by_tp.setdefault(tp, []).append((vocab, tokens))
    if args.device == "cuda" and max(by_tp) > torch.cuda.device_count():
        raise SystemExit(f"TP={max(by_tp)} on CUDA needs that many GPUs, this machine has {torch.cuda.device_count()}")
    rows = []
    for tp, configs in by_tp.items():
        rows += _merge_ranks(run_distributed(_bench, tp, configs, args.repeats, timeout=1200))
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
