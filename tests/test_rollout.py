"""Client, rollout, teacher scoring, weight sync, a killed server and the sglang-router, against two real embedded
servers on 127.0.0.1; numbers are checked against the HF model's own full forward."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from megatron_bpd.rollout import (ClientConfig, RolloutConfig, SamplingParams, SGLangClient, SGLangTeacher,
                                  generate_rollout)
from megatron_bpd.gating import GateConfig
from megatron_bpd.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, UpdateGroup
from megatron_bpd.train.rollout_data import RolloutData, micro_batch
from rollout_fixtures import free_port, load_reference, make_tiny_qwen3, num_finished, num_running, start_servers

PROMPTS = [[5, 17, 42, 99, 7], [9, 9, 4], [250, 1, 3, 3, 60, 61, 12]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def new_weights_dir(tmp_path_factory):
    return make_tiny_qwen3(tmp_path_factory.mktemp("updated"), seed=1)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    procs = start_servers(model_dir, tmp_path_factory.mktemp("logs"), 2)
    yield procs
    for p in procs:
        p.stop()


def run(coro_fn, urls, **config):
    async def main():
        async with SGLangClient(ClientConfig(urls=urls, **config)) as client:
            await client.wait_healthy()
            return await coro_fn(client)
    return asyncio.run(main())


@torch.no_grad()
def ref_response_logprobs(model, prompt, response, temperature=1.0):
    """log_softmax(logits / T) of each response token given its prefix: [T]."""
    logits = model(torch.tensor([prompt + response])).logits[0].float() / temperature
    lps = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return lps, lps.gather(1, torch.tensor(response)[:, None])[:, 0]


def test_rollout_batch_matches_reference(servers, model_dir):
    config = RolloutConfig(n_samples=4, seed=100,
                           sampling=SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=12))
    before = [num_finished(s.url) for s in servers]
    batch = run(lambda c: generate_rollout(c, PROMPTS, config), [s.url for s in servers])
    assert len(batch) == 12 and batch.prompt_index == [i for i in range(3) for _ in range(4)]
    assert all(n > b for n, b in zip([num_finished(s.url) for s in servers], before))  # both servers used
    ref = load_reference(model_dir)
    for b in range(len(batch)):
        assert batch.prompt_ids[b] == PROMPTS[batch.prompt_index[b]]
        resp = batch.response_ids[b]
        assert 1 <= len(resp) <= 12 and batch.loss_mask[b] == [1] * len(resp)
        assert batch.finish_reason[b] == ("length" if len(resp) == 12 else "stop")
        _, expect = ref_response_logprobs(ref, batch.prompt_ids[b], resp, 0.8)
        torch.testing.assert_close(torch.tensor(batch.behavior_logprobs[b]), expect, atol=1e-5, rtol=0)
    assert set(batch.weight_version) == {"default"} and batch.temperature == 0.8
    again = run(lambda c: generate_rollout(c, PROMPTS, config), [servers[1].url])
    assert again.response_ids == batch.response_ids  # per-sample seeds: independent of the server


def test_rollout_marks_stops_and_masks_special_tokens(servers):
    probe = run(lambda c: generate_rollout(c, PROMPTS[:1], RolloutConfig(
        n_samples=1, sampling=SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))), [servers[0].url])
    greedy = probe.response_ids[0]
    stop, special = greedy[4], greedy[1]
    config = RolloutConfig(n_samples=2, seed=0, mask_token_ids=[special],
                           sampling=SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=[stop]))
    batch = run(lambda c: generate_rollout(c, PROMPTS[:1], config), [s.url for s in servers])
    for b in range(2):
        assert batch.response_ids[b] == greedy[: greedy.index(stop) + 1]
        assert batch.finish_reason[b] == "stop"
        assert batch.loss_mask[b] == [0 if t == greedy.index(special) else 1 for t in range(len(batch.response_ids[b]))]


def test_teacher_scores_match_reference(servers, model_dir):
    config = RolloutConfig(n_samples=2, seed=7, sampling=SamplingParams(temperature=1.0, max_new_tokens=9))

    async def rollout_and_score(client):
        batch = await generate_rollout(client, PROMPTS, config)
        return batch, await SGLangTeacher(client, top_k=5).score(batch)
    batch, scores = run(rollout_and_score, [s.url for s in servers])
    ref = load_reference(model_dir)
    assert scores.top_k == 5 and len(scores.token_logprobs) == len(batch)
    for b in range(len(batch)):
        lps, expect = ref_response_logprobs(ref, batch.prompt_ids[b], batch.response_ids[b])
        torch.testing.assert_close(scores.token_logprobs[b], expect, atol=1e-5, rtol=0)
        values, ids = lps.topk(5)
        assert torch.equal(scores.topk_ids[b], ids)
        torch.testing.assert_close(scores.topk_logprobs[b], values, atol=1e-5, rtol=0)
        # at temperature 1 the teacher scores of the student's own model equal the behavior log-probs
        torch.testing.assert_close(scores.token_logprobs[b], torch.tensor(batch.behavior_logprobs[b]), atol=1e-5,
                                   rtol=0)
    # placed on the trainer's label positions, the two line up position by position
    placed = micro_batch(RolloutData(batch, scores), range(len(batch)), 16, GateConfig())
    assert placed.teacher_topk_ids.shape == (len(batch), 16, 5)
    torch.testing.assert_close(placed.teacher_logprobs, placed.behavior_logprobs, atol=1e-5, rtol=0)


def greedy_rollout(urls):
    config = RolloutConfig(n_samples=1, sampling=SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    return run(lambda c: generate_rollout(c, PROMPTS, config), urls)


def expected_greedy(model, prompt, steps=8):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def named_tensors(model):
    return list(model.state_dict().items())


def test_disk_weight_sync_changes_outputs_and_bumps_version(servers, model_dir, new_weights_dir, tmp_path):
    urls = [s.url for s in servers]
    old, new = load_reference(model_dir), load_reference(new_weights_dir)
    before = greedy_rollout(urls)
    assert before.response_ids == [expected_greedy(old, p) for p in PROMPTS]

    async def sync(client, model, version):
        await DiskWeightSync(client, tmp_path / "export", model_dir).update(named_tensors(model), version)
        return await asyncio.gather(*(client.get(u, "/get_weight_version") for u in urls))
    assert run(lambda c: sync(c, new, "step-1"), urls) == [{"weight_version": "step-1"}] * 2
    after = greedy_rollout(urls)
    assert after.response_ids == [expected_greedy(new, p) for p in PROMPTS] != before.response_ids
    assert set(after.weight_version) == {"step-1"}
    assert sorted(p.name for p in (tmp_path / "export" / "step-1").iterdir()) == [
        "config.json", "generation_config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    run(lambda c: sync(c, old, "step-2"), urls)  # restore the original weights for the other tests
    assert greedy_rollout(urls).response_ids == before.response_ids


def test_distributed_weight_sync_over_gloo(servers, model_dir, new_weights_dir, monkeypatch):
    """The NCCL code path with backend gloo: the same endpoints, process group and broadcasts."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    urls = [s.url for s in servers]
    old, new = load_reference(model_dir), load_reference(new_weights_dir)
    group = UpdateGroup("127.0.0.1", free_port(), server_tp_sizes=[1, 1], group_name="test_group", backend="gloo")

    async def sync(client):
        sync = DistributedWeightSync(client, group, bucket_bytes=64 << 10)
        await sync.connect()
        await sync.update(named_tensors(new), "dist-1")
        versions = await asyncio.gather(*(client.get(u, "/get_weight_version") for u in urls))
        await sync.update(named_tensors(old), "dist-2")
        return versions
    versions_mid = run(sync, urls)
    assert versions_mid == [{"weight_version": "dist-1"}] * 2
    assert greedy_rollout(urls).response_ids == [expected_greedy(old, p) for p in PROMPTS]
    assert set(greedy_rollout(urls).weight_version) == {"dist-2"}


def test_rollout_through_sglang_router(servers, model_dir, tmp_path):
    """The real sglang-router (PyPI ``sglang-router``) in front of both servers: a rollout through the router spreads
    over both; weight sync goes to the workers directly."""
    pytest.importorskip("sglang_router", reason="needs the sglang-router package (pip install sglang-router)")
    workers, model = servers, model_dir
    port = free_port()
    router_url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                               str(port), "--policy", "round_robin", "--log-level", "warn",
                               "--worker-urls", *[w.url for w in workers]], stdout=log, stderr=subprocess.STDOUT)
    try:
        # The router answers /health before it has registered its workers (0.3.x adds them in a background job):
        # wait until /workers lists both as healthy, or the first requests all go to whichever came first.
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{router_url}/workers", timeout=2) as r:
                    listed = json.load(r)["workers"]
                if sorted(w["url"] for w in listed if w["is_healthy"]) == sorted(w.url for w in workers):
                    break
            except OSError:
                pass
            if router.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sglang-router did not list both workers:\n{(tmp_path / 'router.log').read_text()}")
            time.sleep(0.2)
        before = [num_finished(w.url) for w in workers]
        config = RolloutConfig(n_samples=4, seed=3, sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))
        prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]

        async def main():
            client_config = ClientConfig(urls=[router_url], control_urls=[w.url for w in workers])
            async with SGLangClient(client_config) as client:
                await client.wait_healthy()
                batch = await generate_rollout(client, prompts, config)
                served = [await asyncio.to_thread(num_finished, w.url) - b for w, b in zip(workers, before)]
                await DiskWeightSync(client, tmp_path / "export", model).update(
                    load_reference(model).state_dict().items(), "via-router")
                versions = [await client.get(w.url, "/get_weight_version") for w in workers]
                return batch, served, versions
        batch, served, versions = asyncio.run(main())
    finally:
        router.terminate()
        router.wait(timeout=30)
    assert len(batch) == 12 and all(len(r) == 8 for r in batch.response_ids)
    assert sum(served) == 12 and min(served) >= 3  # round robin over both workers
    assert versions == [{"weight_version": "via-router"}] * 2


def test_server_killed_mid_rollout_loses_and_duplicates_nothing(servers, model_dir, tmp_path):
    """Kill one of two servers while its requests are in flight: they are retried on the other server and the
    batch equals the same seeded rollout on a healthy server."""
    (victim,), survivor = start_servers(model_dir, tmp_path, 1), servers[0]
    prompts = [[i + 1, 2 * i + 3, 7] for i in range(4)]
    config = RolloutConfig(n_samples=4, seed=5, sampling=SamplingParams(max_new_tokens=64, ignore_eos=True))
    try:
        async def killed_midway():
            async with SGLangClient(ClientConfig(urls=[victim.url, survivor.url], backoff_s=0.05)) as client:
                task = asyncio.create_task(generate_rollout(client, prompts, config))
                while await asyncio.to_thread(num_running, victim.url) < 8:  # its half of the requests in flight
                    await asyncio.sleep(0.01)
                finished_before_kill = await asyncio.to_thread(num_finished, victim.url)
                victim.kill()
                return await task, finished_before_kill
        batch, finished_before_kill = asyncio.run(killed_midway())

        async def healthy():
            async with SGLangClient(ClientConfig(urls=[survivor.url])) as client:
                return await generate_rollout(client, prompts, config)
        reference = asyncio.run(healthy())
    finally:
        victim.stop()
    assert victim.proc.returncode == -9 and finished_before_kill == 0
    assert len(batch) == 16 and batch.prompt_index == reference.prompt_index
    assert batch.response_ids == reference.response_ids
    assert all(len(r) == 64 for r in batch.response_ids) and set(batch.finish_reason) == {"length"}


def test_aborted_responses_are_kept_and_marked(servers, model_dir):
    """pause_generation(abort) mid-rollout: the cut responses come back marked "abort", with their log-probs."""
    urls = [s.url for s in servers]
    config = RolloutConfig(n_samples=2, seed=9, sampling=SamplingParams(max_new_tokens=400, ignore_eos=True))

    async def main(client):
        task = asyncio.create_task(generate_rollout(client, PROMPTS, config))
        while sum([await asyncio.to_thread(num_running, u) for u in urls]) < 6:
            await asyncio.sleep(0.01)
        await client.post_all("/pause_generation", {"mode": "abort"})
        await client.post_all("/continue_generation", {})
        return await task
    batch = run(main, urls)
    assert len(batch) == 6 and set(batch.finish_reason) == {"abort"}
    ref = load_reference(model_dir)
    for b in range(6):
        assert len(batch.response_ids[b]) < 400
        if batch.response_ids[b]:
            _, expect = ref_response_logprobs(ref, batch.prompt_ids[b], batch.response_ids[b])
            torch.testing.assert_close(torch.tensor(batch.behavior_logprobs[b]), expect, atol=1e-5, rtol=0)
