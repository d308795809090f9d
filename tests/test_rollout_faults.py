"""Faults: servers answering garbage, 5xx, hangs. Misbehaving servers are small in-process aiohttp apps on
127.0.0.1 (the real server cannot be made to misbehave); the server killed mid-rollout is in test_rollout.py."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from aiohttp import web

from megatron_bpd.rollout import (ClientConfig, GenerateRequest, ProtocolError, RolloutConfig, ServerError,
                                  SGLangClient, generate_rollout)
from rollout_fixtures import free_port


def good_body(n_tokens=2, logprob=-0.5):
    ids = list(range(10, 10 + n_tokens))
    return {"text": "", "output_ids": ids, "meta_info": {
        "id": "x", "finish_reason": {"type": "length", "length": n_tokens}, "prompt_tokens": 1,
        "completion_tokens": n_tokens, "weight_version": "0",
        "output_token_logprobs": [[logprob, t, None] for t in ids]}}


async def serve(handler):
    """Run ``handler`` as POST /generate on 127.0.0.1; returns (url, runner)."""
    app = web.Application()
    app.router.add_post("/generate", handler)
    app.router.add_get("/health", lambda r: web.Response())
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


def rollout_against(handler, n_samples=2, **config):
    async def main():
        url, runner = await serve(handler)
        try:
            async with SGLangClient(ClientConfig(urls=[url], backoff_s=0.01, **config)) as client:
                return await generate_rollout(client, [[1, 2]], RolloutConfig(n_samples=n_samples))
        finally:
            await runner.cleanup()
    return asyncio.run(main())


@pytest.mark.parametrize("respond, error", [
    (lambda: web.Response(text="{not json", content_type="application/json"), "malformed JSON"),
    (lambda: web.Response(text="<html>oops</html>", content_type="text/html"), "malformed JSON"),
    (lambda: web.json_response(good_body() | {"output_ids": [10]}), "completion_tokens=2 but 1 output_ids"),
    (lambda: web.json_response({**good_body(), "meta_info": {**good_body()["meta_info"], "output_token_logprobs": [
        [-0.5, 10, None]]}}), "do not match"),
    (lambda: web.Response(text=json.dumps(good_body(logprob=math.nan)), content_type="application/json"),
     "not a finite number"),
    (lambda: web.json_response({**good_body(), "meta_info": {**good_body()["meta_info"],
                                                             "output_token_logprobs": None}}), "missing"),
    (lambda: web.json_response({**good_body(), "meta_info": {**good_body()["meta_info"],
                                                             "finish_reason": {"type": "eos"}}}), "finish_reason"),
])
def test_malformed_responses_raise_clear_errors(respond, error):
    async def handler(request):
        return respond()
    with pytest.raises(ProtocolError, match=error):
        rollout_against(handler)


def test_5xx_and_503_are_retried_4xx_is_not():
    calls = []

    async def flaky(request):
        calls.append(1)
        return web.Response(status=503 if len(calls) < 3 else 200, text=json.dumps(good_body()),
                            content_type="application/json")
    batch = rollout_against(flaky, max_concurrency=1)
    assert len(batch) == 2 and len(calls) == 4

    calls.clear()

    async def bad_request(request):
        calls.append(1)
        return web.json_response({"error": {"message": "nope"}}, status=400)
    with pytest.raises(ServerError, match="HTTP 400"):
        rollout_against(bad_request, n_samples=1)
    assert len(calls) == 1


def test_hung_server_times_out_within_bounds():
    async def hang(request):
        await asyncio.sleep(30)
        return web.json_response(good_body())
    start = time.monotonic()
    with pytest.raises(ServerError, match="failed after 2 attempts.*TimeoutError"):
        rollout_against(hang, request_timeout_s=0.5, max_retries=1)
    assert time.monotonic() - start < 5


def test_wait_healthy_times_out():
    async def main():
        async with SGLangClient(ClientConfig(urls=[f"http://127.0.0.1:{free_port()}"], health_timeout_s=1)) as c:
            await c.wait_healthy()
    with pytest.raises(TimeoutError, match="/health not ready"):
        asyncio.run(main())


def test_generate_needs_an_open_client():
    with pytest.raises(RuntimeError, match="not open"):
        asyncio.run(SGLangClient(ClientConfig(urls=["http://127.0.0.1:1"])).generate(GenerateRequest([1])))
