"""Every request the client sends and every response the embedded server returns validates against SGLang's own
JSON contract: ``sglang/api/v1/api_types.py`` of the sglang 0.5.23 wheel, loaded by file path (msgspec only; no
sglang runtime import). The wheel is downloaded once with ``pip download --no-deps`` into
~/.cache/megatron-bpd/sglang-0.5.23/; the tests skip only when the package registry cannot be reached."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from megatron_bpd.rollout import (ClientConfig, RolloutConfig, SamplingParams, SGLangClient, SGLangTeacher,
                                  generate_rollout)
from megatron_bpd.rollout.protocol import SGLANG_SAMPLING_KEYS, ProtocolError
from megatron_bpd.rollout.weight_sync import DiskWeightSync
from megatron_bpd.serve.app import parse_sampling_params
from rollout_fixtures import free_port, load_reference, make_tiny_qwen3, start_servers

SGLANG_VERSION = "0.5.23"
CACHE = Path(os.environ.get("MEGATRON_BPD_CACHE", Path.home() / ".cache" / "megatron-bpd")) / f"sglang-{SGLANG_VERSION}"
_OFFLINE_HINTS = ("NewConnectionError", "ConnectionError", "Max retries exceeded", "Temporary failure in name",
                  "Network is unreachable", "No matching distribution found", "Could not find a version")


def load_api_types():
    """The api_types module of sglang==0.5.23, downloading and caching the wheel's file when needed."""
    target = CACHE / "api_types.py"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        wheels = sorted(CACHE.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.12", "--implementation", "cp", "--abi", "cp312", "--platform", "manylinux_2_34_x86_64",
                   f"sglang=={SGLANG_VERSION}", "-d", str(CACHE)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                if any(h in result.stderr for h in _OFFLINE_HINTS):
                    pytest.skip(f"the package registry is unreachable, cannot fetch sglang=={SGLANG_VERSION}: "
                                f"{result.stderr.strip()[-300:]}")
                raise RuntimeError(f"pip download sglang=={SGLANG_VERSION} failed:\n{result.stderr[-2000:]}")
            wheels = sorted(CACHE.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            target.write_bytes(wheel.read("sglang/api/v1/api_types.py"))
    spec = importlib.util.spec_from_file_location("sglang_api_types_0_5_23", target)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # msgspec resolves the forward references through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def api():
    return load_api_types()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    (proc,) = start_servers(model_dir, tmp_path_factory.mktemp("logs"), 1)
    yield proc
    proc.stop()


class ValidatingProxy:
    """Forwards everything to ``upstream`` and checks the SGLang-typed bodies in both directions."""

    def __init__(self, api, upstream: str):
        self.api, self.upstream = api, upstream
        self.checked: dict[str, int] = {}
        self.violations: list[str] = []
        self.requests = {"/generate": api.GenerateRequest, "/abort_request": api.AbortRequest}
        self.responses = {"/generate": api.GenerateResponse, "/abort_request": api.AbortResponse,
                          "/model_info": api.GetModelInfoResponse, "/server_info": api.GetServerInfoResponse}

    def check(self, kind, value, where):
        try:
            kind.from_json_value(value)
            self.checked[where] = self.checked.get(where, 0) + 1
        except Exception as exc:  # noqa: BLE001 - every contract violation is collected
            self.violations.append(f"{where}: {type(exc).__name__}: {exc}")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path, raw = request.path, await request.read()
        if path in self.requests and raw:
            self.check(self.requests[path], json.loads(raw), f"request {path}")
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, self.upstream + path, data=raw,
                                       headers={"Content-Type": "application/json"}) as up:
                body, ctype, status = await up.read(), up.headers.get("Content-Type", ""), up.status
        if path in self.responses and status == 200:
            if ctype.startswith("text/event-stream"):
                events = [e[len("data: "):] for e in body.decode().split("\n\n") if e]
                if events[-1] != "[DONE]":
                    self.violations.append("stream does not end with data: [DONE]")
                for event in events[:-1]:
                    self.check(self.responses[path], json.loads(event), f"stream {path}")
            else:
                value = json.loads(body)
                for item in value if isinstance(value, list) else [value]:
                    self.check(self.responses[path], item, f"response {path}")
        return web.Response(body=body, status=status, headers={"Content-Type": ctype})


def test_contract_file_is_sglangs(api):
    assert set(api._FIELDS_SamplingParams) == SGLANG_SAMPLING_KEYS
    with pytest.raises(api.JsonContractError):
        api.GenerateResponse.from_json_value({"output_ids": "not a list"})


def test_client_requests_and_server_responses_conform(api, server, model_dir, tmp_path):
    proxy = ValidatingProxy(api, server.url)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def scenario():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with SGLangClient(ClientConfig(urls=[url])) as client:
                await client.wait_healthy()
                batch = await generate_rollout(client, [[5, 6, 7], [8, 9]], RolloutConfig(
                    n_samples=2, seed=1, sampling=SamplingParams(temperature=0.9, top_p=0.9, top_k=20,
                                                                 max_new_tokens=6, stop_token_ids=[3])))
                await SGLangTeacher(client, top_k=4).score(batch)
                model = load_reference(model_dir)
                await DiskWeightSync(client, tmp_path, model_dir).update(model.state_dict().items(), "v1")
                await client.get(url, "/model_info")
                await client.get(url, "/server_info")
                await client.post(url, "/abort_request", {"rid": "nothing"})
                raw = {"input_ids": [[5, 6], [7]], "rid": ["a", "b"], "return_logprob": True,
                       "logprob_start_len": 0, "top_logprobs_num": 3,
                       "sampling_params": {"n": 2, "max_new_tokens": 3, "temperature": 0}}
                await client.post(url, "/generate", raw)
                async with aiohttp.ClientSession() as s:
                    async with s.post(url + "/generate", json={"input_ids": [5], "stream": True,
                                                               "sampling_params": {"max_new_tokens": 3}}) as r:
                        await r.read()
        finally:
            await runner.cleanup()
    asyncio.run(scenario())
    assert proxy.violations == []
    assert proxy.checked["request /generate"] == 4 + 4 + 2 and proxy.checked["response /generate"] == 4 + 4 + 4
    assert proxy.checked["stream /generate"] == 3
    assert {"response /model_info", "response /server_info", "request /abort_request",
            "response /abort_request"} <= set(proxy.checked)


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_token_ids": [1], "n": 2},
    {"max_new_tokens": 0, "sampling_seed": 3, "no_stop_trim": True, "skip_special_tokens": False},
    {"max_new_tokens": 3, "not_a_sampling_key": 1},
    {"temperature": 1.0, "max_tokens": 5},
])
def test_unknown_sampling_keys_rejected_like_sglang(api, params):
    try:
        api.decode_SamplingParams(params)
        sglang_accepts = True
    except api.JsonContractError:
        sglang_accepts = False
    try:
        parse_sampling_params(params)
        ours_accepts = True
    except ProtocolError:
        ours_accepts = False
    assert ours_accepts == sglang_accepts
