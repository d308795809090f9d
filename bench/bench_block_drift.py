"""Benchmark block_drift_gates: the extension, the PyTorch reference and a memory-bandwidth floor.

Layout: n tokens as sequences of 2048 (the last one cut at n), each with 256 ungated prompt positions and then
Block-64 segments over the response; mask ~90% true; float32 log-probs; signed mean, exp gate, normalized.
The floor ("copy") copies the buffers the op must touch into preallocated outputs: cur, old, mask (what it reads)
and a float32 [n] buffer (what it writes), i.e. the op's 13 bytes per position, each read once and written once;
"fresh output" allocates and fills a float32 [n] (the first-touch cost of the op's own output). "drift_gates" is the
public call end to end on the same packed layout (cu_seqlens, response_starts: layout, segment bounds, the op, the
per-segment stats; the 0-d summaries are lazy), "+ summaries" also reads them (what a logging trainer pays).
Times are medians over --repeats calls after 2 warmup calls (the last column compares the fastest calls); CPU
runs use torch.set_num_threads(t) for each t in --threads (default 2); CUDA runs synchronize around each call.
--device: "auto" (default) runs the CPU and, when there is one, the GPU; "cpu" or "cuda" only that.

    python bench/bench_block_drift.py                       # print the table
    python bench/bench_block_drift.py --write BENCHMARKS.md # also replace the section in that file
    python bench/bench_block_drift.py --device cuda --json rows.json  # GPU only, rows also as JSON
"""

import argparse
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch

from megatron_bpd import gating, ops

SECTION = "## Block drift gate (issue 2)"
SEQUENCE, PROMPT, BLOCK = 2048, 256, 64


def block_layout(n, device):
    """Block-64 segments over the responses of ceil(n / 2048) sequences (int64 seg_start, seg_end)."""
    seq_starts = torch.arange(0, n, SEQUENCE, device=device)
    offsets = torch.arange(PROMPT, SEQUENCE, BLOCK, device=device)
    starts = (seq_starts[:, None] + offsets[None, :]).flatten()
    starts = starts[starts < n]
    return starts, torch.clamp(starts + BLOCK, max=n)


def inputs(n, device):
    gen = torch.Generator().manual_seed(0)
    old = -3 * torch.rand(n, generator=gen)
    cur = old + 0.1 * torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.9
    return (cur.to(device), old.to(device), mask.to(device), *block_layout(n, device))


def timings_ms(fn, repeats, device):
    """(median, min) milliseconds of fn over `repeats` calls after 2 warmup calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), min(times)


def bench(n, device, repeats):
    args = inputs(n, device)
    cur, old, mask = args[:3]
    copies = [(torch.empty_like(x), x) for x in (cur, old, mask, torch.rand(n, device=device))]

    def extension():
        ops.set_backend("extension")
        ops.block_drift_gates(*args)

    def reference():
        ops.set_backend("reference")
        ops.block_drift_gates(*args)

    def copy():
        for dst, src in copies:
            dst.copy_(src)

    def fresh_output():
        torch.empty(n, device=device).fill_(1.0)

    cu_seqlens = torch.cat([torch.arange(0, n, SEQUENCE), torch.tensor([n])]).to(device)
    response_starts = torch.full((cu_seqlens.numel() - 1,), PROMPT, device=device)
    config = gating.GateConfig(block_size=BLOCK)

    def drift_gates():
        ops.set_backend("auto")
        return gating.drift_gates(cur, old, mask, config, cu_seqlens=cu_seqlens, response_starts=response_starts)

    def with_summaries():
        drift_gates()[1]["gate_mean"]

    return [timings_ms(fn, repeats, device) for fn in (extension, reference, copy, fresh_output, drift_gates,
                                                        with_summaries)]


def table(rows):
    """Markdown table of medians; the last column compares the fastest calls (less sensitive to a busy machine)."""
    lines = ["| device | n | extension ms | reference ms | copy ms | fresh output ms | drift_gates ms "
             "| + summaries ms | ref/ext | ext/copy | ext/copy, fastest calls | drift_gates/copy, fastest calls "
             "| + summaries/copy, fastest calls |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for device, n, (ext, ext_min), (ref, _), (cp, cp_min), (fresh, _), (dg, dg_min), (full, full_min) in rows:
        lines.append(f"| {device} | {n:.0e} | {ext:.3f} | {ref:.3f} | {cp:.3f} | {fresh:.3f} | {dg:.3f} | {full:.3f} "
                     f"| {ref / ext:.1f}x | {ext / cp:.2f}x | {ext_min / cp_min:.2f}x | {dg_min / cp_min:.2f}x "
                     f"| {full_min / cp_min:.2f}x |")
    return "\n".join(lines)


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def write_section(path, text):
    """Replace (or append) this benchmark's section of a Markdown file; other sections are left as they are."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    path.write_text(new)


def json_rows(rows):
    """The table's rows as dicts (milliseconds: median and fastest call)."""
    keys = ("extension", "reference", "copy", "fresh_output")
    return [dict(device=device, n=n, **{f"{k}_ms": t[0] for k, t in zip(keys, times)},
                 **{f"{k}_min_ms": t[1] for k, t in zip(keys, times)},
                 ref_over_ext=times[1][0] / times[0][0], ext_over_copy=times[0][0] / times[2][0])
            for device, n, *times in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="CPU thread counts to run")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--write", metavar="MARKDOWN", help="replace the benchmark's section in this file")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    cli = parser.parse_args()
    if not ops.extension_available():
        raise SystemExit("megatron_bpd._C is not built: pip install -e . first")
    if cli.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    runs = []
    if cli.device != "cuda":
        runs += [(torch.device("cpu"), t, f"cpu, {t} thread{'s' if t > 1 else ''}") for t in cli.threads]
    if cli.device != "cpu" and torch.cuda.is_available():
        runs.append((torch.device("cuda"), max(cli.threads), torch.cuda.get_device_name()))
    load_before = os.getloadavg()[0]
    rows = []
    for device, threads, name in runs:
        torch.set_num_threads(threads)
        for size in cli.sizes:
            rows.append((name, int(size), *bench(int(size), device, cli.repeats)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = table(rows)
    print(result)
    if cli.json:
        Path(cli.json).write_text(json.dumps(json_rows(rows), indent=1))
    if cli.write:
        command = " ".join(["python", *sys.argv])
        load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (machine shared)"
        gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
        notes = (
            f"`block_drift_gates` (float32 log-probs, Block-64 over sequences of 2048 with 256 ungated prompt "
            f"positions, mask ~90% true, signed mean, exp gate, normalized) against the PyTorch reference and a copy "
            f"floor: copying the op's input and output buffers (13 bytes/position) into preallocated tensors, so the "
            f"floor moves each byte in and out and never page-faults, while the op allocates its outputs ("
            f"\"fresh output\": allocating and filling a float32 [n], part of the op's cost). Median ms over "
            f"{cli.repeats} calls after warmup; CPU rows with torch.set_num_threads(t) for the t shown; the last "
            f"column compares the fastest calls, which a busy machine disturbs less. With 2 threads on a shared "
            f"2-core machine a parallel region waits whenever another process holds a core; the reference (many "
            f"small ops) suffers most. \"drift_gates\" is the public call end to end on the packed layout (cu_seqlens, "
            f"response_starts; its 0-d summaries are lazy), \"+ summaries\" also reads them.",
            f"Command: `{command}`",
            f"Machine: {cpu_name()}{gpu}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d')}; {load}.",
        )
        paragraphs = [textwrap.fill(x, 116, break_on_hyphens=False) for x in notes]
        write_section(cli.write, "\n\n".join([SECTION, *paragraphs, result]) + "\n")


if __name__ == "__main__":
    main()
