r"""``python -m megatron_bpd.eval`` (also ``megatron-bpd eval``): pass@k on the shipped math benchmarks.

Examples::

    # a running SGLang server / router (the tokenizer gives the chat template)
    python -m megatron_bpd.eval --urls http://10.0.0.5:30000 --tokenizer /ckpt/qwen3-1.7b-opd --out runs/eval
    # start the embedded server on the model, evaluate, stop it
    python -m megatron_bpd.eval --model /ckpt/qwen3-1.7b-opd --out runs/eval
    # smoke test: 2 problems per benchmark
    python -m megatron_bpd.eval --model /tmp/tiny --out /tmp/ev --limit 2 -n 2 -k 1 2 --max-new-tokens 16

Writes ``results.json`` (config, per-benchmark pass@k, per-problem correct counts and per-sample verdicts, the
mean) and ``results.md`` (the table) into ``--out``, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path

from megatron_bpd.eval.benchmarks import available_benchmarks, load_benchmarks
from megatron_bpd.eval.runner import DEFAULT_PROMPT_TEMPLATE, EvalConfig, EvalResult, evaluate_urls_async


def _split_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n.strip().lower() for v in values for n in v.split(",") if n.strip()]


def _split_ints(values: list[str]) -> list[int]:
    try:
        return [int(n) for v in values for n in str(v).split(",") if n.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"-k takes integers: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-bpd eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--urls", nargs="+", metavar="URL", help="SGLang server or router URLs (round robin)")
    src.add_argument("--model", metavar="HF_DIR",
                     help="start the embedded server (python -m megatron_bpd.serve) on this HF model folder")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: --model; required with --urls)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for results.json and results.md")
    p.add_argument("--benchmarks", nargs="+", metavar="NAME",
                   help=f"subset (space or comma separated) of {', '.join(available_benchmarks())} (default: all)")
    p.add_argument("--data-dir", metavar="DIR", help="benchmark JSONL folder (default: the shipped data)")
    p.add_argument("--limit", type=int, metavar="N", help="first N problems of each benchmark (smoke tests)")
    p.add_argument("-n", "--n-samples", type=int, default=8, help="samples per problem")
    p.add_argument("-k", "--k", nargs="+", default=["1", "8"], metavar="K", help="pass@k values (each <= n)")
    p.add_argument("--max-new-tokens", type=int, default=16384)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0,
                   help="sample j of problem i of a benchmark uses seed + (10000 * benchmark slot + i) * n + j; "
                   "-1: server-chosen seeds")
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                   help="user message; {problem} is replaced by the problem; @FILE reads the template from FILE")
    p.add_argument("--system-prompt", default=None, help="optional system message (@FILE reads it from FILE)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the filled prompt template as raw text instead of through the chat template")
    p.add_argument("--chat-template-kwargs", type=json.loads, default=None, metavar="JSON",
                   help='extra chat-template variables, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--context-length", type=int, default=None,
                   help="cap max new tokens at this minus the prompt length (servers reject longer requests)")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per /generate request")
    p.add_argument("--check-timeout", type=int, default=5, help="math-verify time limit per parse/compare (s)")
    p.add_argument("--check-workers", type=int, default=0,
                   help="score answers in this many worker processes (0: in the main process)")
    p.add_argument("--save-responses", action="store_true", help="keep the decoded responses in results.json")
    p.add_argument("--server-args", default="", metavar="'ARGS'",
                   help="extra arguments for the embedded server, e.g. '--dtype bfloat16 --max-running-requests 128'")
    p.add_argument("--server-startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _read_at(value: str | None) -> str | None:
    if value is not None and value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")
    return value


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        n_samples=args.n_samples, ks=_split_ints(args.k), max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=None if args.seed < 0 else args.seed,
        prompt_template=_read_at(args.prompt_template), system_prompt=_read_at(args.system_prompt),
        use_chat_template=not args.no_chat_template, chat_template_kwargs=args.chat_template_kwargs,
        context_length=args.context_length,
        check_timeout_s=args.check_timeout if args.check_timeout > 0 else None, check_workers=args.check_workers,
        keep_responses=args.save_responses)


def run(args: argparse.Namespace) -> EvalResult:
    from transformers import AutoTokenizer

    from megatron_bpd.rollout.embedded import EmbeddedServer

    config = config_from_args(args)
    tokenizer_dir = args.tokenizer or args.model
    if tokenizer_dir is None:
        raise SystemExit("megatron-bpd eval: --tokenizer is required with --urls (the chat template comes from it)")
    benchmarks = load_benchmarks(_split_names(args.benchmarks), args.limit, args.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(progress=not args.no_progress, max_concurrency=args.max_concurrency,
                  request_timeout_s=args.request_timeout)
    meta = {"model": args.model, "urls": args.urls, "tokenizer": str(tokenizer_dir),
            "benchmarks": list(benchmarks), "limit": args.limit, "argv": sys.argv[1:]}
    if args.model:
        with EmbeddedServer(args.model, extra_args=shlex.split(args.server_args), log_path=out / "server.log",
                            startup_timeout_s=args.server_startup_timeout) as server:
            meta["urls"] = [server.url]
            result = asyncio.run(evaluate_urls_async([server.url], tokenizer, benchmarks, config, **kwargs))
    else:
        result = asyncio.run(evaluate_urls_async(args.urls, tokenizer, benchmarks, config, **kwargs))
    result.data["meta"].update(meta)
    result.write(out)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``megatron-bpd eval``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # time-outs are reported in the results instead
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(result.to_markdown().split("\n## ")[0].rstrip())
    print(f"\nwrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'results.md'}")
    return 0
