"""Qwen3 conversion throughput and peak memory on a synthetic checkpoint of a few GB.

    python bench/bench_convert.py --work /tmp/bench-qwen3 [--size 1.7B --layers 16 --tp 1 2]

Writes a random bf16 HF checkpoint with the shapes of ``--size`` (layers cut to ``--layers``), converts it to
torch_dist at each ``--tp`` and exports it back (at TP1), and prints one row per run: HF GB, seconds inside the
ranks (build + read + save, without process start-up), GB/s, and per rank the peak resident memory (VmHWM: includes
the mmapped safetensors pages it touched, which are clean page cache the kernel can drop) and the peak anonymous
memory (RssAnon sampled every 20 ms: what the rank really holds). The HF files are in the page cache (just
written): this measures CPU-side cost, not disk speed.
"""

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_bpd.models.qwen3 import (
    Qwen3Arch, convert_hf_to_megatron, export_megatron_to_hf, hf_shapes, qwen3_hf_config, run_parallel,
)
from megatron_bpd.models.qwen3.hf_io import HFWriter


SMOKE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
             head_dim=64)  # --smoke: these override the size's shapes


def write_synthetic(hf_dir: Path, size: str, layers: int, **shapes) -> int:
    """A random bf16 checkpoint with the shapes of ``size`` (``shapes`` override config entries) and ``layers``
    layers, in 1 GiB shards; its bytes."""
    config = qwen3_hf_config(size, num_hidden_layers=layers, **shapes)
    writer = HFWriter(hf_dir, max_shard_bytes=2**30)
    gen = torch.Generator().manual_seed(0)
    for name, shape in tqdm(hf_shapes(Qwen3Arch.from_hf(config)).items(), desc="synthetic checkpoint"):
        writer.add(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    return writer.total_bytes


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**20


def _timed(fn, report: str, *args, **kwargs) -> None:
    """Run ``fn`` on this rank and append (seconds, peak resident GB, peak anonymous GB) to ``report``."""
    import torch.distributed as dist

    peak_anon, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_gb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    dist.barrier()
    sampler.start()
    start = time.perf_counter()
    fn(*args, progress=False, **kwargs)
    dist.barrier()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    row = {"rank": dist.get_rank(), "seconds": seconds, "hwm_gb": _status_gb("VmHWM"), "anon_gb": peak_anon[0]}
    with open(report, "a") as f:
        f.write(json.dumps(row) + "\n")


def run(label: str, nbytes: int, tp: int, fn, *args) -> dict:
    report = Path(args[-1]).with_suffix(".jsonl")
    report.unlink(missing_ok=True)
    run_parallel(_timed, tp, 1, fn, str(report), *args)
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    seconds = max(r["seconds"] for r in rows)
    row = dict(run=label, tp=tp, gb=round(nbytes / 1e9, 2), seconds=round(seconds, 1),
               gb_per_s=round(nbytes / 1e9 / seconds, 3), peak_rss_gb=round(max(r["hwm_gb"] for r in rows), 2),
               peak_anon_gb=round(max(r["anon_gb"] for r in rows), 2))
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder (removed at the end)")
    parser.add_argument("--size", default="1.7B")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="seconds: 1 layer of hidden 128, vocab 1024, TP 1")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.tp = 1, [1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work)
    hf = work / "hf"
    nbytes = write_synthetic(hf, args.size, args.layers, **(SMOKE if args.smoke else {}))
    try:
        for tp in args.tp:
            run("convert", nbytes, tp, convert_hf_to_megatron, str(hf), str(work / f"megatron-tp{tp}"))
        run("export", nbytes, 1, export_megatron_to_hf, str(work / f"megatron-tp{args.tp[-1]}"), str(work / "export"))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
