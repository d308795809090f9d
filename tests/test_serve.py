"""The embedded SGLang-protocol server against an independent reference: the HF model's full forward."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
import torch

from rollout_fixtures import add_tokenizer, load_reference, make_tiny_qwen3, start_servers

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    (proc,) = start_servers(model_dir, tmp_path_factory.mktemp("logs"), 1)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ref(model_dir):
    return load_reference(model_dir)


def post(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if "json" in r.headers.get("Content-Type", "") else text)
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        return e.code, (json.loads(text) if "json" in e.headers.get("Content-Type", "") else text)


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


@torch.no_grad()
def ref_logprobs(ref, tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[len(tokens), V]: row p = log_softmax(logits(tokens[:p + 1]) / T), predicting token p + 1."""
    logits = ref(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def lp_values(entries):
    return [e[0] for e in entries]


def test_greedy_tokens_and_logprobs_match_reference(server, ref):
    status, out = post(server.url, "/generate", {
        "input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
        "return_logprob": True, "top_logprobs_num": 4})
    assert status == 200
    ids = out["output_ids"]
    assert len(ids) == 8 and out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    lps = ref_logprobs(ref, PROMPT + ids)[len(PROMPT) - 1 : -1]  # rows predicting each output token
    assert ids == lps.argmax(-1).tolist()
    got = torch.tensor(lp_values(out["meta_info"]["output_token_logprobs"]))
    torch.testing.assert_close(got, lps.gather(1, torch.tensor(ids)[:, None])[:, 0], atol=1e-5, rtol=0)
    for t, row in enumerate(out["meta_info"]["output_top_logprobs"]):
        values, top_ids = lps[t].topk(4)
        assert [e[1] for e in row] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor(lp_values(row)), values, atol=1e-5, rtol=0)
    assert [e[1] for e in out["meta_info"]["output_token_logprobs"]] == ids
    assert out["meta_info"]["input_token_logprobs"] == []  # logprob_start_len -1


def test_sampling_logprobs_are_tempered_before_filtering(server, ref):
    """Output log-probs = log_softmax(logits / T) over the full vocabulary; tokens come from top-k / top-p."""
    params = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 24, "sampling_seed": 11,
              "ignore_eos": True}
    status, out = post(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": params,
                                                 "return_logprob": True})
    assert status == 200
    ids = out["output_ids"]
    lps = ref_logprobs(ref, PROMPT + ids, 0.7)[len(PROMPT) - 1 : -1]
    got = torch.tensor(lp_values(out["meta_info"]["output_token_logprobs"]))
    torch.testing.assert_close(got, lps.gather(1, torch.tensor(ids)[:, None])[:, 0], atol=1e-5, rtol=0)
    for t, tok in enumerate(ids):
        probs, order = lps[t].exp().sort(descending=True)
        rank = order.tolist().index(tok)
        assert rank < 5 and probs[:rank].sum() < 0.9 + 1e-6
    assert len(set(ids)) > 1  # not greedy
    _, again = post(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": params})
    assert again["output_ids"] == ids  # seeded
    _, other = post(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": params | {"sampling_seed": 12}})
    assert other["output_ids"] != ids


def test_prefill_only_input_logprobs_layout(server, ref):
    tokens = PROMPT + [3, 8, 250, 1]
    status, out = post(server.url, "/generate", {
        "input_ids": tokens, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 4, "top_logprobs_num": 3})
    assert status == 200 and out["output_ids"] == []
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    entries, top = out["meta_info"]["input_token_logprobs"], out["meta_info"]["input_top_logprobs"]
    assert [e[1] for e in entries] == tokens[4:] and entries[0][0] is None and top[0] is None
    lps = ref_logprobs(ref, tokens)
    for i, p in enumerate(range(5, len(tokens)), start=1):
        assert abs(entries[i][0] - lps[p - 1, tokens[p]].item()) < 1e-5
        values, ids = lps[p - 1].topk(3)
        assert [e[1] for e in top[i]] == ids.tolist()
        torch.testing.assert_close(torch.tensor(lp_values(top[i])), values, atol=1e-5, rtol=0)


def test_batch_with_n_is_grouped_per_prompt(server):
    prompts = [PROMPT, [9, 9, 4]]
    status, outs = post(server.url, "/generate", {
        "input_ids": prompts, "rid": ["a", "b"],
        "sampling_params": {"n": 3, "max_new_tokens": 5, "sampling_seed": 3, "ignore_eos": True}})
    assert status == 200 and len(outs) == 6
    assert [o["meta_info"]["id"] for o in outs] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [5, 5, 5, 3, 3, 3]
    assert len({tuple(o["output_ids"]) for o in outs[:3]}) > 1  # the n samples differ
    for o in outs:  # sample j of a prompt equals a single request seeded sampling_seed + j
        j = int(o["meta_info"]["id"][-1])
        prompt = prompts[0] if o["meta_info"]["id"][0] == "a" else prompts[1]
        _, solo = post(server.url, "/generate", {"input_ids": prompt, "sampling_params": {
            "max_new_tokens": 5, "sampling_seed": 3 + j, "ignore_eos": True}})
        assert solo["output_ids"] == o["output_ids"]


def test_concurrent_requests_match_solo_runs(server):
    """Continuous batching (different lengths joining and leaving) gives the same tokens as one at a time."""
    prompts = [[(7 * i + k) % 300 for k in range(3 + 2 * i)] for i in range(8)]
    body = lambda i: {"input_ids": prompts[i], "sampling_params": {  # noqa: E731
        "temperature": 0.9, "max_new_tokens": 4 + 3 * i, "sampling_seed": i, "ignore_eos": True}}

    async def run_all():
        async with aiohttp.ClientSession() as s:
            async def one(i):
                async with s.post(server.url + "/generate", json=body(i)) as r:
                    return (await r.json())["output_ids"]
            return await asyncio.gather(*(one(i) for i in range(8)))
    together = asyncio.run(run_all())
    for i in range(8):
        assert post(server.url, "/generate", body(i))[1]["output_ids"] == together[i]


def test_stream_is_cumulative_and_ends_with_done(server):
    body = {"input_ids": PROMPT, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "sampling_seed": 5, "ignore_eos": True}}
    req = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == list(range(1, 7))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    solo = post(server.url, "/generate", body | {"stream": False})[1]
    assert chunks[-1]["output_ids"] == solo["output_ids"]
    assert chunks[-1]["meta_info"]["output_token_logprobs"] == solo["meta_info"]["output_token_logprobs"]


def test_stop_token_ids_and_eos(server):
    greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    ids = post(server.url, "/generate", {"input_ids": PROMPT, "sampling_params": greedy})[1]["output_ids"]
    stop = ids[2]
    body = {"input_ids": PROMPT, "sampling_params": greedy | {"stop_token_ids": [stop]}}
    out = post(server.url, "/generate", body)[1]
    first = ids.index(stop)
    assert out["output_ids"] == ids[: first + 1]  # the stop token is part of output_ids, as in SGLang
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


@pytest.mark.parametrize("body, needle", [
    ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "not_a_key": 1}}, "not_a_key"),
    ({"input_ids": PROMPT, "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"input_ids": [5, 300], "sampling_params": {}}, "input_ids"),
    ({"input_ids": PROMPT, "logprob_start_len": 5, "return_logprob": True}, "logprob_start_len"),
    ({"input_ids": PROMPT, "sampling_params": {"top_p": 0}}, "top_p"),
    ({"text": "hello"}, "tokenizer"),
])
def test_bad_requests_are_400(server, body, needle):
    status, out = post(server.url, "/generate", body)
    assert status == 400 and needle in out["error"]["message"]


def test_status_and_control_endpoints(server, model_dir):
    assert get(server.url, "/model_info")["model_path"] == str(model_dir)
    info = get(server.url, "/server_info")
    assert info["max_context_length"] == 512 and info["port"] == server.port
    assert get(server.url, "/get_weight_version") == {"weight_version": "default"}
    assert post(server.url, "/flush_cache")[0] == 200
    status, out = post(server.url, "/update_weights_from_disk", {"model_path": "/nonexistent"})
    assert status == 400 and out["success"] is False


def test_abort_and_pause(server):
    long = {"input_ids": PROMPT, "rid": "long-one", "sampling_params": {"max_new_tokens": 480, "ignore_eos": True}}
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=post(server.url, "/generate", long)[1]))
    worker.start()
    deadline = time.monotonic() + 30
    while get(server.url, "/server_info")["internal_states"][0]["num_requests"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert post(server.url, "/abort_request", {"rid": "long-one"})[1] == {"success": True}
    worker.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(result["out"]["output_ids"]) < 480

    assert post(server.url, "/pause_generation", {"mode": "in_place"})[0] == 200
    short = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}}
    worker = threading.Thread(target=lambda: result.update(paused=post(server.url, "/generate", short)[1]))
    worker.start()
    worker.join(1.0)
    assert worker.is_alive()  # held while paused
    assert post(server.url, "/continue_generation")[0] == 200
    worker.join(30)
    assert len(result["paused"]["output_ids"]) == 3


def test_health_is_503_until_loaded(model_dir):
    """In-process: the server answers 503 while the engine is still loading the model."""
    from aiohttp import web

    from megatron_bpd.serve.app import SGLangServer
    from megatron_bpd.serve.engine import Engine
    from megatron_bpd.serve.weights import load_model
    from rollout_fixtures import free_port

    release = threading.Event()
    engine = Engine(lambda: (release.wait(), load_model(str(model_dir)))[1])
    port = free_port()

    async def scenario():
        runner = web.AppRunner(SGLangServer(engine, str(model_dir), "127.0.0.1", port).app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        engine.start()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/health") as r:
                before = r.status
            async with s.post(f"http://127.0.0.1:{port}/generate", json={"input_ids": [1]}) as r:
                gen_before = r.status
            release.set()
            await asyncio.to_thread(engine.loaded.wait, 60)
            async with s.get(f"http://127.0.0.1:{port}/health") as r:
                after = r.status
        engine.stop()
        await runner.cleanup()
        return before, gen_before, after
    assert asyncio.run(scenario()) == (503, 503, 200)


def test_engine_failure_aborts_requests_and_keeps_serving(model_dir):
    """A failing forward pass fails the requests in flight (abort, status 500) and the engine serves the next."""
    from megatron_bpd.rollout.protocol import SamplingParams
    from megatron_bpd.serve.engine import Engine, Sequence
    from megatron_bpd.serve.sampling import SamplingRow
    from megatron_bpd.serve.weights import load_model

    engine = Engine(lambda: load_model(str(model_dir)))
    engine.start()
    assert engine.loaded.wait(60)
    done = {}

    def submit(name):
        event = threading.Event()
        seq = Sequence(rid=name, request_rid=name, prompt=PROMPT, params=SamplingParams(max_new_tokens=4),
                       sampling=SamplingRow(1.0, 1.0, -1, torch.Generator().manual_seed(0)),
                       notify=lambda s, n: (done.__setitem__(name, s), event.set()) if s.finish else None)
        engine.submit([[seq]])
        assert event.wait(30)
        return done[name]

    forward = engine.runner.forward
    engine.runner.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    failed = submit("bad")
    assert failed.finish["type"] == "abort" and failed.finish["status_code"] == 500
    assert "boom" in failed.finish["message"]
    engine.runner.forward = forward
    ok = submit("good")
    assert ok.finish["type"] == "length" and len(ok.output_ids) == 4
    engine.stop()


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    model = add_tokenizer(make_tiny_qwen3(tmp_path_factory.mktemp("with-tokenizer")))
    (proc,) = start_servers(model, tmp_path_factory.mktemp("logs"), 1)
    from transformers import AutoTokenizer
    yield proc, AutoTokenizer.from_pretrained(model)
    proc.stop()


def test_text_prompts_and_stop_strings(text_server):
    server, tokenizer = text_server
    greedy = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    status, out = post(server.url, "/generate", {"text": "hello world", "sampling_params": greedy,
                                                 "return_logprob": True, "return_text_in_logprobs": True})
    assert status == 200 and out["meta_info"]["prompt_tokens"] == len(tokenizer.encode("hello world"))
    ids = out["output_ids"]
    assert out["text"] == tokenizer.decode(ids)
    assert [e[2] for e in out["meta_info"]["output_token_logprobs"]] == [tokenizer.decode([t]) for t in ids]
    stop = next(tokenizer.decode([t]) for t in ids[3:] if tokenizer.decode([t]).strip())
    k = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    for trim in (False, True):
        _, cut = post(server.url, "/generate", {"text": "hello world", "sampling_params": greedy | {
            "stop": stop, "no_stop_trim": not trim}})
        assert cut["output_ids"] == ids[:k] and cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        full = tokenizer.decode(ids[:k])
        assert cut["text"] == (full[: full.index(stop)] if trim else full)


def test_api_key_is_required_except_on_health_and_the_client_sends_it(model_dir, tmp_path, monkeypatch):
    """``--api-key`` as in SGLang: 401 without ``Authorization: Bearer <key>``, /health and /health_generate open;
    the client takes the key from ClientConfig.api_key or $SGLANG_API_KEY."""
    from megatron_bpd.rollout import ClientConfig, GenerateRequest, SamplingParams, ServerError, SGLangClient

    (secured,) = start_servers(model_dir, tmp_path, 1, "--api-key", "s3cret", "--weight-version", "7")
    try:
        def status(path, headers=None, body=None):
            req = urllib.request.Request(secured.url + path, headers=headers or {}, method="POST" if body else "GET",
                                         data=json.dumps(body).encode() if body else None)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        generate = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}
        assert status("/health") == 200 and status("/health_generate") == 200
        assert status("/get_weight_version") == 401 and status("/generate", body=generate) == 401
        assert status("/generate", {"Authorization": "Bearer wrong"}, generate) == 401
        assert status("/generate", {"Authorization": "s3cret"}, generate) == 401
        assert status("/generate", {"Authorization": "Bearer s3cret"}, generate) == 200

        async def sample(config):
            async with SGLangClient(config) as client:
                await client.wait_healthy()
                request = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2), return_logprob=True)
                return (await client.generate(request))[0]

        monkeypatch.delenv("SGLANG_API_KEY", raising=False)
        with pytest.raises(ServerError, match="401"):
            asyncio.run(sample(ClientConfig(urls=[secured.url])))
        out = asyncio.run(sample(ClientConfig(urls=[secured.url], api_key="s3cret")))
        assert len(out.output_ids) == 2 and out.weight_version == "7"
        monkeypatch.setenv("SGLANG_API_KEY", "s3cret")
        assert len(asyncio.run(sample(ClientConfig(urls=[secured.url]))).output_ids) == 2
    finally:
        secured.stop()
