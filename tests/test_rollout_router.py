"""The real sglang-router (PyPI ``sglang-router``) in front of two embedded servers: a rollout through the router
spreads over both, and weight sync goes to the workers directly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import pytest

from megatron_bpd.rollout import ClientConfig, RolloutConfig, SamplingParams, SGLangClient, generate_rollout
from megatron_bpd.rollout.weight_sync import DiskWeightSync
from rollout_fixtures import free_port, load_reference, make_tiny_qwen3, num_finished, start_servers

pytest.importorskip("sglang_router", reason="needs the sglang-router package (pip install sglang-router)")


def test_rollout_through_sglang_router(tmp_path):
    model = make_tiny_qwen3(tmp_path / "model")
    workers = start_servers(model, tmp_path, 2)
    port = free_port()
    router_url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "router.log", "w")
    router = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port",
                               str(port), "--policy", "round_robin", "--log-level", "warn",
                               "--worker-urls", *[w.url for w in workers]], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{router_url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if router.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sglang-router did not come up:\n{(tmp_path / 'router.log').read_text()}")
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
        for w in workers:
            w.stop()
    assert len(batch) == 12 and all(len(r) == 8 for r in batch.response_ids)
    assert sum(served) == 12 and min(served) >= 3  # round robin over both workers
    assert versions == [{"weight_version": "via-router"}] * 2
