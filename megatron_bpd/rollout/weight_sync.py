"""Pushing the trainer's weights to the inference servers after an optimizer step.

Sequence on every server (as slime does): pause_generation -> flush_cache -> load the new weights (tagged with the
new weight_version) -> continue_generation. Two transports share it:

- ``DiskWeightSync``: write HF safetensors (+ the model folder's config files) to a directory every server can
  read, then POST ``/update_weights_from_disk``. Works everywhere, including the embedded CPU server.
- ``DistributedWeightSync``: trainer rank 0 and every server's TP ranks form a process group
  (``/init_weights_update_group``); per bucket of tensors the servers get ``/update_weights_from_distributed``
  with names, dtypes and shapes while rank 0 broadcasts the tensors (NCCL on GPU clusters). SGLang >= 0.5.2x
  requires ``/begin_weight_update`` and ``/end_weight_update`` around those calls.

Weights come in as an iterable of (HF name, tensor); mapping Megatron names to HF names happens upstream.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from megatron_bpd.rollout.client import ServerError, SGLangClient

NamedTensors = Iterable[tuple[str, torch.Tensor]]
_CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json", "vocab.json", "merges.txt")


async def paused_update(client: SGLangClient, load, pause_mode: str = "abort") -> None:
    """pause -> flush -> ``await load()`` -> continue on every control server; generation resumes even if the
    load fails (the error is re-raised)."""
    await client.post_all("/pause_generation", {"mode": pause_mode})
    try:
        await client.post_all("/flush_cache")
        await load()
    finally:
        await client.post_all("/continue_generation", {})


def _check_success(results: Sequence[Any], what: str) -> None:
    for r in results:
        if not (isinstance(r, dict) and r.get("success", False)):
            raise ServerError(f"{what} failed on a server: {r!r}")


class DiskWeightSync:
    """Export to ``export_dir/<version>`` (a shared filesystem on clusters) and load from disk."""

    def __init__(self, client: SGLangClient, export_dir: str | Path, hf_config_dir: str | Path,
                 pause_mode: str = "abort", max_shard_bytes: int = 4 << 30):
        self.client, self.export_dir, self.hf_config_dir = client, Path(export_dir), Path(hf_config_dir)
        self.pause_mode, self.max_shard_bytes = pause_mode, max_shard_bytes

    async def update(self, named_tensors: NamedTensors, version: str) -> None:
        path = await asyncio.to_thread(self.export, named_tensors, version)

        async def load():
            payload = {"model_path": str(path), "weight_version": version, "flush_cache": True,
                       "abort_all_requests": False}
            _check_success(await self.client.post_all("/update_weights_from_disk", payload), "update_weights_from_disk")
        await paused_update(self.client, load, self.pause_mode)

    def export(self, named_tensors: NamedTensors, version: str) -> Path:
        """Write an HF folder: safetensors shards of at most ``max_shard_bytes`` with an index, plus config files."""
        from safetensors.torch import save_file

        path = self.export_dir / str(version)
        path.mkdir(parents=True, exist_ok=True)
        for name in _CONFIG_FILES:
            if (self.hf_config_dir / name).exists():
                shutil.copy(self.hf_config_dir / name, path / name)
        shards = list(bucket_named_tensors(named_tensors, self.max_shard_bytes))
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: t.detach().contiguous().cpu() for n, t in shard}, str(path / file), metadata={"format": "pt"})
            weight_map.update({n: file for n, _ in shard})
            total += sum(t.numel() * t.element_size() for _, t in shard)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return path


def bucket_named_tensors(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of tensors of at most ``bucket_bytes`` each (a larger tensor forms its own group)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class UpdateGroup:
    """The trainer-to-servers process group: trainer rank 0, server k's TP ranks from ``rank_offset(k)`` on."""

    master_address: str
    master_port: int
    server_tp_sizes: Sequence[int]
    group_name: str = "weight_update_group"
    backend: str = "nccl"

    @property
    def world_size(self) -> int:
        return 1 + sum(self.server_tp_sizes)

    def init_payloads(self) -> list[dict[str, Any]]:
        """One ``/init_weights_update_group`` body per server, in server order."""
        offsets = [1 + sum(self.server_tp_sizes[:k]) for k in range(len(self.server_tp_sizes))]
        return [{"master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                 "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
                for off in offsets]


def update_payload(bucket: Sequence[tuple[str, torch.Tensor]], group_name: str,
                   weight_version: str | None) -> dict[str, Any]:
    """The ``/update_weights_from_distributed`` body announcing one bucket; dtypes as SGLang names them
    ("bfloat16", "float32", ...). The weight version goes with the last bucket only."""
    return {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name, "flush_cache": False,
            "abort_all_requests": False, "weight_version": weight_version}


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta = timedelta(minutes=10)):
    """A process group outside the default one, keyed exactly as SGLang's ``init_custom_process_group`` (same
    rendezvous and PrefixStore(group_name)), so the trainer and SGLang servers meet in it."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                    rendezvous)

    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                      group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class DistributedWeightSync:
    """Broadcast from trainer rank 0 (call ``connect`` once, then ``update`` after each step, on rank 0 only).
    ``control_urls`` of the client must list the servers in the order of ``group.server_tp_sizes``."""

    def __init__(self, client: SGLangClient, group: UpdateGroup, bucket_bytes: int = 512 << 20,
                 pause_mode: str = "abort", session_endpoints: bool = True):
        if len(client.config.control_urls) != len(group.server_tp_sizes):
            raise ValueError(f"{len(client.config.control_urls)} control URLs but {len(group.server_tp_sizes)} "
                             f"server TP sizes in the update group")
        self.client, self.group, self.bucket_bytes = client, group, bucket_bytes
        self.pause_mode, self.session_endpoints = pause_mode, session_endpoints
        self.process_group = None

    async def connect(self) -> None:
        """Servers and rank 0 join the group together (each side blocks until all ranks arrived)."""
        g = self.group
        posts = [self.client.post(url, "/init_weights_update_group", body)
                 for url, body in zip(self.client.config.control_urls, g.init_payloads())]
        join = asyncio.to_thread(init_custom_process_group, g.backend, f"tcp://{g.master_address}:{g.master_port}",
                                 g.world_size, 0, g.group_name)
        *results, self.process_group = await asyncio.gather(*posts, join)
        _check_success(results, "init_weights_update_group")

    async def update(self, named_tensors: NamedTensors, version: str) -> None:
        if self.process_group is None:
            raise RuntimeError("DistributedWeightSync.update before connect()")

        async def load():
            if self.session_endpoints:
                _check_success(await self.client.post_all("/begin_weight_update", {}), "begin_weight_update")
            buckets = list(bucket_named_tensors(named_tensors, self.bucket_bytes))
            for i, bucket in enumerate(buckets):
                body = update_payload(bucket, self.group.group_name, version if i == len(buckets) - 1 else None)
                posts = self.client.post_all("/update_weights_from_distributed", body)
                results, _ = await asyncio.gather(posts, asyncio.to_thread(self._broadcast, bucket))
                _check_success(results, "update_weights_from_distributed")
            if self.session_endpoints:
                _check_success(await self.client.post_all("/end_weight_update", {}), "end_weight_update")
        await paused_update(self.client, load, self.pause_mode)

    def _broadcast(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Rank 0 sends every tensor of the bucket, in order, to all ranks of the group."""
        for _, tensor in bucket:
            torch.distributed.broadcast(tensor.detach().contiguous(), src=0, group=self.process_group)
