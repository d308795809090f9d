"""``python -m megatron_bpd.serve --model HF_DIR --host 127.0.0.1 --port N`` (also ``megatron-bpd serve``)."""

from __future__ import annotations

import argparse
import logging
import os

import torch
from aiohttp import web

from megatron_bpd.serve.app import SGLangServer
from megatron_bpd.serve.engine import Engine
from megatron_bpd.serve.weights import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-bpd serve",
                                     description="Serve an HF Qwen3 checkpoint over SGLang's native HTTP protocol.")
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="HF model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--max-running-requests", type=int, default=64, help="sequences decoded together")
    parser.add_argument("--max-prefill-tokens", type=int, default=16384,
                        help="prompt tokens prefilled in one batch (a longer prompt is prefilled alone)")
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step through torch.compile (compiled at start: seconds to minutes, "
                             "cached on disk for the next start; ~1.3-1.4x the decode throughput on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seeds requests that carry no sampling_seed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: OMP_NUM_THREADS)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on every request but /health* (as SGLang)")
    parser.add_argument("--weight-version", default="default", help="the weight version reported before any update")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point; the server answers /health with 503 until the model is loaded."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    engine = Engine(lambda: load_model(args.model, DTYPES[args.dtype]), max_running=args.max_running_requests,
                    max_prefill_tokens=args.max_prefill_tokens, compile=args.compile)
    engine.weight_version = args.weight_version
    server = SGLangServer(engine, args.model, args.host, args.port, seed=args.seed, api_key=args.api_key)

    async def on_startup(app: web.Application) -> None:
        engine.start()

    async def on_cleanup(app: web.Application) -> None:
        engine.stop()
    server.app.on_startup.append(on_startup)
    server.app.on_cleanup.append(on_cleanup)
    web.run_app(server.app, host=args.host, port=args.port, handler_cancellation=True, shutdown_timeout=1.0,
                print=None, access_log=None)
