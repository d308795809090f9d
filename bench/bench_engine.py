"""Decode throughput of the embedded engine against Hugging Face ``generate`` and one core's FLOP roofline.

For each model (``student``: the shipped task student, hidden 128; ``hidden256``: a random Qwen3 of hidden 256 made
by ``megatron_bpd.models.tiny.make_tiny_qwen3``) and each batch size B, with one torch thread:
  engine: B requests (a ``--prompt-len`` random prompt, ``--new-tokens`` sampled tokens each, EOS ignored,
          return_logprob) submitted at once to ``megatron_bpd.serve.engine.Engine``, driven directly (no HTTP);
  compiled (``--compile``): the same with ``Engine(compile=True)`` (the decode step through torch.compile; the
          seconds its start takes, compilation included, are printed);
  hf:     ``model.generate`` on the same batch and sampling settings (do_sample, same temperature and top-p,
          top-k off, exactly ``--new-tokens`` tokens; no log-probs returned);
  roofline: the core's measured fp32 matmul rate (best 512x512x512 GEMM) / the model's FLOPs per token
          (2 x the weights of every matmul incl. the output layer, plus attention 4 x context x q-heads x head dim
          per layer at the mean context).
Each number is completion tokens per CPU second of this process (prefill included; the engine thread and the
caller together, so it equals wall time on an idle machine and does not count time other jobs take the core on a
shared one), best of ``--repeats``. ``--baseline PKG`` also
times another engine with the same API (``PKG.engine``, ``PKG.sampling``; e.g. a copy of an older
``megatron_bpd/serve`` renamed to PKG and put on PYTHONPATH), side by side in the same run.

    OMP_NUM_THREADS=1 python bench/bench_engine.py --json runs/engine.json
    OMP_NUM_THREADS=1 PYTHONPATH=runs/old_engine python bench/bench_engine.py --baseline old_serve
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_bpd.experiment import SHIPPED_MODELS  # noqa: E402
from megatron_bpd.rollout.protocol import SamplingParams  # noqa: E402
from megatron_bpd.serve.weights import load_model  # noqa: E402


def hidden256(folder: Path) -> Path:
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(folder, layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32, ffn=768, vocab=8192)


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def engine_rate(package: str, model, batch: list[list[int]], args, **options) -> float:
    """Completion tokens / s of ``package``'s Engine (constructed with ``options``) on ``batch`` (best of
    ``args.repeats``)."""
    engine_module = importlib.import_module(f"{package}.engine")
    row = importlib.import_module(f"{package}.sampling").SamplingRow
    engine = engine_module.Engine(lambda: (model, None), max_running=max(len(batch), 1), **options)
    start = time.perf_counter()
    engine.start()
    engine.loaded.wait()
    if options:
        print(f"engine {options} started in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    best = 0.0
    try:
        for repeat in range(args.repeats + 1):  # the first run warms up
            done = threading.Semaphore(0)
            seqs = [engine_module.Sequence(
                rid=str(i), request_rid=str(i), prompt=p, return_logprob=True,
                params=SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, ignore_eos=True),
                sampling=row(args.temperature, args.top_p, -1, torch.Generator().manual_seed(repeat * 1000 + i)),
                notify=lambda s, n, done=done: done.release() if s.finish is not None else None)
                for i, p in enumerate(batch)]
            start = time.process_time()
            engine.submit([[s] for s in seqs])
            for _ in seqs:
                done.acquire()
            seconds = time.process_time() - start
            if repeat:
                best = max(best, sum(len(s.output_ids) for s in seqs) / seconds)
    finally:
        engine.stop()
    return best


@torch.inference_mode()
def hf_rate(model, batch: list[list[int]], args) -> float:
    tokens = torch.tensor(batch)
    best = 0.0
    for repeat in range(args.repeats + 1):
        torch.manual_seed(repeat)
        start = time.process_time()
        out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=True,
                             temperature=args.temperature, top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=0)
        seconds = time.process_time() - start
        if repeat:
            best = max(best, (out.shape[1] - tokens.shape[1]) * tokens.shape[0] / seconds)
    return best


def matmul_flops_per_s(size: int = 512, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best


def flops_per_token(config, context: float) -> float:
    """2 x the matmul weights a token passes (projections, MLP, output layer) + attention at ``context``."""
    h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size) + 4 * context * q
    return config.num_hidden_layers * per_layer + 2 * h * config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["student", "hidden256"], choices=["student", "hidden256"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs (after one warm-up)")
    parser.add_argument("--baseline", help="also time the engine of this package (same API), e.g. old_serve")
    parser.add_argument("--compile", action="store_true", help="also time the engine with compile=True")
    parser.add_argument("--json", help="write {'rows': [...]} here")
    parser.add_argument("--smoke", action="store_true", help="seconds: the student, batch 1 and 2, 4 new tokens")
    args = parser.parse_args()
    if args.smoke:
        args.models, args.batch, args.new_tokens, args.prompt_len, args.repeats = ["student"], [1, 2], 4, 8, 1
    torch.set_num_threads(1)
    rate = matmul_flops_per_s()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = SHIPPED_MODELS / "student" if name == "student" else hidden256(Path(tmp) / name)
            model, _ = load_model(str(folder))
            roofline = rate / flops_per_token(model.config, args.prompt_len + args.new_tokens / 2)
            for b in args.batch:
                batch = prompts(b, args.prompt_len, model.config.vocab_size)
                row = {"model": name, "batch": b, "engine_tokens_per_s": engine_rate("megatron_bpd.serve", model,
                                                                                     batch, args)}
                if args.compile:
                    row["compiled_tokens_per_s"] = engine_rate("megatron_bpd.serve", model, batch, args, compile=True)
                if args.baseline:
                    row["baseline_tokens_per_s"] = engine_rate(args.baseline, model, batch, args)
                row |= {"hf_tokens_per_s": hf_rate(model, batch, args), "roofline_tokens_per_s": roofline}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, temperature {args.temperature}, top-p "
          f"{args.top_p}, return_logprob; one torch thread; best of {args.repeats}; fp32 matmul {rate / 1e9:.1f} "
          f"GFLOP/s; torch {torch.__version__}, Python {platform.python_version()}\n")
    engines = ["engine"] + ["compiled"] * args.compile  # each with its ratios to HF and to the roofline
    extra = " baseline tokens/s |" if args.baseline else ""
    print(f"| model | batch |{''.join(f' {e} tokens/s |' for e in engines)}{extra} HF generate tokens/s | roofline "
          f"tokens/s |{''.join(f' {e} / HF | {e} / roofline |' for e in engines)}")
    print("|---|---:|" + "---:|" * (3 * len(engines) + 2 + bool(args.baseline)))
    for r in rows:
        rates = [r[f"{e}_tokens_per_s"] for e in engines]
        extra = f" {r['baseline_tokens_per_s']:.0f} |" if args.baseline else ""
        print(f"| {r['model']} | {r['batch']} |{''.join(f' {x:.0f} |' for x in rates)}{extra} "
              f"{r['hf_tokens_per_s']:.0f} | {r['roofline_tokens_per_s']:.0f} |"
              + "".join(f" {x / r['hf_tokens_per_s']:.2f} | {x / r['roofline_tokens_per_s']:.2f} |" for x in rates))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
