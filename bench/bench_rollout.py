"""Rollout throughput of the embedded SGLang-protocol server and the overhead of the rollout client.

For each concurrency c the same workload (``--requests-per-level`` x c requests, a ``--prompt-len`` prompt,
``--new-tokens`` sampled tokens each, return_logprob on) runs twice against one server process:
  server: a bare aiohttp loop keeping c requests in flight (the server's capacity);
  client: ``generate_rollout`` through ``SGLangClient(max_concurrency=c)`` (parsing, checks, TrajectoryBatch).
Reported: completion tokens/s of each, their ratio (client overhead; 1.0 = none), and the CPU time the calling
process spends per request in each (the client's own cost, independent of the server and of machine load).

    OMP_NUM_THREADS=1 python bench/bench_rollout.py            # builds a small random Qwen3 in a temp dir
    python bench/bench_rollout.py --model HF_DIR --concurrency 1 2 4 8 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_bpd.rollout import (ClientConfig, RolloutConfig, SamplingParams, SGLangClient,  # noqa: E402
                                  generate_rollout)
from megatron_bpd.rollout.embedded import EmbeddedServer  # noqa: E402


def make_model(path: Path, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), head_dim=32,
                         max_position_embeddings=4096, eos_token_id=0, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def workload(count: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(count)]


async def bare(url: str, prompts, concurrency: int, new_tokens: int) -> tuple[int, float]:
    """Keep ``concurrency`` requests in flight with a minimal client; (completion tokens, wall seconds)."""
    queue = asyncio.Queue()
    for i, p in enumerate(prompts):
        queue.put_nowait((i, p))
    total = 0

    async def worker(session):
        nonlocal total
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"input_ids": prompt, "return_logprob": True, "sampling_params": {
                "max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 1.0, "sampling_seed": i}}
            async with session.post(f"{url}/generate", json=body) as r:
                total += (await r.json())["meta_info"]["completion_tokens"]
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return total, time.perf_counter() - start


async def through_client(url: str, prompts, concurrency: int, new_tokens: int) -> tuple[int, float]:
    config = RolloutConfig(n_samples=1, seed=0, sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    async with SGLangClient(ClientConfig(urls=[url], max_concurrency=concurrency)) as client:
        start = time.perf_counter()
        batch = await generate_rollout(client, prompts, config)
        return sum(len(r) for r in batch.response_ids), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF Qwen3 folder (default: build a random one)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests-per-level", type=int, default=4, help="requests = this x concurrency")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    parser.add_argument("--smoke", action="store_true", help="seconds: a hidden-64 model, concurrency 1 and 2, "
                                                             "4 new tokens, one run")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.vocab, args.concurrency, args.requests_per_level = 64, 512, [1, 2], 1
        args.prompt_len, args.new_tokens, args.repeats = 8, 4, 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the server process on the way out
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else make_model(Path(tmp) / "model", args.hidden, args.layers,
                                                               args.vocab)
        server = EmbeddedServer(model, env=dict(os.environ, OMP_NUM_THREADS="1"), log_path=Path(tmp) / "server.log",
                                extra_args=["--log-level", "warning"]).start()
        try:
            asyncio.run(bare(server.url, workload(4, args.prompt_len, args.vocab), 4, 8))  # warm-up
            rows = []
            for c in args.concurrency:
                prompts = workload(args.requests_per_level * c, args.prompt_len, args.vocab)
                best, cpu = {"server": 0.0, "client": 0.0}, {"server": [], "client": []}
                for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
                    for name, fn in (("server", bare), ("client", through_client)):
                        cpu_start = time.process_time()
                        tokens, seconds = asyncio.run(fn(server.url, prompts, c, args.new_tokens))
                        best[name] = max(best[name], tokens / seconds)
                        cpu[name].append((time.process_time() - cpu_start) * 1e3 / len(prompts))
                rows.append((c, best["server"], best["client"], min(cpu["server"]), min(cpu["client"])))
                print(f"concurrency {c}: server {best['server']:.0f} tok/s, client {best['client']:.0f} tok/s",
                      file=sys.stderr, flush=True)
        finally:
            server.stop()
    cpu = os.cpu_count()
    described = args.model or f"random Qwen3 hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    print(f"model: {described}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.requests_per_level} x c requests, "
          f"return_logprob; best of {args.repeats}; torch {torch.__version__}, Python {platform.python_version()}, "
          f"{cpu} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} (server: 1)\n")
    print("| concurrency | server tokens/s | client tokens/s | client / server | caller CPU ms/request: bare | "
          "caller CPU ms/request: client |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, s, cl, cpu_bare, cpu_client in rows:
        print(f"| {c} | {s:.0f} | {cl:.0f} | {cl / s:.2f} | {cpu_bare:.1f} | {cpu_client:.1f} |")


if __name__ == "__main__":
    main()
