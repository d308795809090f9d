"""Weights in and out of a Qwen3 GPTModel: HF safetensors -> this rank's shards (``load_hf_weights``), this
model -> full HF tensors (``iter_hf_weights``, ``save_hf_checkpoint``), Megatron-Core distributed checkpoints
(torch_dist), and the HF <-> Megatron conversions the tools run. All of it goes through ``mapping``."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import Qwen3Arch
from .hf_io import HFReader, HFWriter, copy_side_files
from .mapping import hf_shapes, hf_tensors, megatron_shard, shard_shape, tensor_maps
from .model import build_model, global_parameters, unwrap

SIDECAR = "megatron_bpd.json"  # in a converted checkpoint: model family, layer spec, padded vocab
HF_SUBDIR = "hf"  # in a converted checkpoint: the HF config.json and tokenizer files


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def check_hf_checkpoint(reader: HFReader, arch: Qwen3Arch) -> None:
    """Raise ValueError unless the checkpoint holds exactly the tensors of ``arch``, each with its shape."""
    expected = hf_shapes(arch)
    missing = sorted(set(expected) - set(reader.files))
    unused = sorted(set(reader.files) - set(expected))
    if missing:
        raise ValueError(f"HF checkpoint {reader.dir} lacks {len(missing)} tensor(s) its config.json implies: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unused:
        hint = " (a tied model must not hold lm_head.weight)" if "lm_head.weight" in unused else ""
        raise ValueError(f"HF checkpoint {reader.dir} holds {len(unused)} tensor(s) the Qwen3 mapping does not use"
                         f"{hint}: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}")
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ValueError(f"shape mismatch: {name} is {list(reader.shape(name))} in "
                             f"{reader.dir / reader.files[name]}, its config.json implies {list(shape)}")


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_hf_weights(model, hf_dir: "str | Path", progress: bool = True) -> None:
    """Fill this rank's shards of ``model`` (from ``build_model``) straight from the HF safetensors in ``hf_dir``.

    Reads only the rows/columns this rank owns. Raises ValueError for a missing, unexpected or misshapen tensor,
    and RuntimeError if a parameter of this rank was left unfilled.
    """
    model = unwrap(model)
    info = model.qwen3
    reader = HFReader(hf_dir)
    check_hf_checkpoint(reader, info.arch)
    tp_rank, tp = _tp()
    params = global_parameters(model)
    maps = [tm for tm in tensor_maps(info.arch, info.te) if tm.megatron in params]
    for tm in tqdm(maps, desc="load HF weights", unit="tensor", disable=not (progress and _is_rank0())):
        param = params.pop(tm.megatron)
        shape = shard_shape(tm, info.arch, tp, info.padded_vocab_size)
        if tuple(param.shape) != shape:
            raise ValueError(f"{tm.megatron}: the mapping gives {list(shape)} from {tm.hf}, the model has "
                             f"{list(param.shape)}")
        megatron_shard(tm, info.arch, reader.read, tp_rank, tp, info.padded_vocab_size, out=param.data)
    if params:
        raise RuntimeError(f"parameters without an HF source (mapping out of date?): {sorted(params)}")


def _stage_layers(model) -> "list[list[int]]":
    """The global layer indices of every pipeline stage, in stage order."""
    from megatron.core import parallel_state as ps

    mine = [layer.layer_number - 1 for layer in model.decoder.layers]
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    return stages


@torch.no_grad()
def iter_hf_weights(model):
    """Yield (HF name, full unsharded tensor) for every tensor of the HF checkpoint, in HF order per layer.

    A collective over this rank's TP x PP group: every member must iterate to the end and gets the same
    tensors (gathered over TP by the owning stage, broadcast over PP). Vocab padding is stripped, qkv and fc1
    are split back. Tensors come in the model's ``params_dtype`` (megatron's local torch norms are float32 in a
    bfloat16 model) on its device.
    """
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    info = model.qwen3
    params = global_parameters(model)
    _, tp = _tp()
    stages, pp_rank = _stage_layers(model), ps.get_pipeline_model_parallel_rank()
    dtype, device = model.config.params_dtype, next(iter(params.values())).device
    shapes = hf_shapes(info.arch)
    for tm in tensor_maps(info.arch, info.te):
        if tm.tied:
            continue
        if tm.layer is not None:
            owner = next(i for i, layers in enumerate(stages) if tm.layer in layers)
        else:
            owner = 0 if tm.megatron.startswith("embedding.") else len(stages) - 1
        if owner == pp_rank:
            shard = params[tm.megatron].detach().contiguous()
            shards = [torch.empty_like(shard) for _ in range(tp)] if tp > 1 else [shard]
            if tp > 1:
                dist.all_gather(shards, shard, group=ps.get_tensor_model_parallel_group())
            tensors = {name: t.to(dtype) for name, t in hf_tensors(tm, info.arch, shards).items()}
        else:
            tensors = {name: torch.empty(shapes[name], dtype=dtype, device=device) for name in tm.hf}
        for name, tensor in tensors.items():
            if len(stages) > 1:
                tensor = tensor.contiguous()
                dist.broadcast(tensor, group=ps.get_pipeline_model_parallel_group(), group_src=owner)
            yield name, tensor


def save_hf_checkpoint(model, out_dir: "str | Path", side_files_from: "str | Path | None" = None,
                       max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> None:
    """Write ``model`` as an HF Qwen3 folder (safetensors, config.json, tokenizer files copied from
    ``side_files_from``) that transformers and SGLang load. Collective over the TP x PP group; global rank 0
    writes (data-parallel replicas iterate too but write nothing)."""
    info = unwrap(model).qwen3
    writes = _is_rank0()
    writer = HFWriter(out_dir, max_shard_bytes) if writes else None
    total = len(hf_shapes(info.arch))
    for name, tensor in tqdm(iter_hf_weights(model), total=total, desc="export HF weights", unit="tensor",
                             disable=not (progress and writes)):
        if writes:
            writer.add(name, tensor)
    if not writes:
        return
    writer.close()
    config = dict(info.arch.hf)
    dtype = str(unwrap(model).config.params_dtype).removeprefix("torch.")
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if side_files_from is not None:
        copy_side_files(side_files_from, out_dir)


def save_megatron_checkpoint(model, ckpt_dir: "str | Path", hf_dir: "str | Path | None" = None) -> None:
    """Save ``model`` as a torch_dist distributed checkpoint (loadable at any TP/PP the model allows) with the HF
    config and tokenizer files (from ``hf_dir``) in ``ckpt_dir/hf`` and a ``megatron_bpd.json`` sidecar."""
    from megatron.core import dist_checkpointing

    base = unwrap(model)
    ckpt_dir = Path(ckpt_dir)
    if _is_rank0():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(base.sharded_state_dict(), str(ckpt_dir))
    if _is_rank0():
        info = base.qwen3
        side = ckpt_dir / HF_SUBDIR
        side.mkdir(exist_ok=True)
        (side / "config.json").write_text(json.dumps(info.arch.hf, indent=2, sort_keys=True) + "\n")
        if hf_dir is not None:
            copy_side_files(hf_dir, side)
        meta = {"model": "qwen3", "transformer_impl": "transformer_engine" if info.te else "local",
                "padded_vocab_size": info.padded_vocab_size,
                "dtype": str(base.config.params_dtype).removeprefix("torch.")}
        (ckpt_dir / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()


def read_sidecar(ckpt_dir: "str | Path") -> dict:
    path = Path(ckpt_dir) / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a checkpoint written by megatron_bpd (no {SIDECAR})")
    return json.loads(path.read_text())


def load_megatron_checkpoint(model, ckpt_dir: "str | Path") -> None:
    """Load a checkpoint from ``save_megatron_checkpoint`` into ``model`` (any TP/PP; same padded vocab)."""
    from megatron.core import dist_checkpointing

    base = unwrap(model)
    meta = read_sidecar(ckpt_dir)
    if meta["padded_vocab_size"] != base.qwen3.padded_vocab_size:
        raise ValueError(f"{ckpt_dir} has padded vocab {meta['padded_vocab_size']}, this model "
                         f"{base.qwen3.padded_vocab_size} (different TP/vocab_divisible_by): not loadable as is")
    state = dist_checkpointing.load(base.sharded_state_dict(), str(ckpt_dir))
    base.load_state_dict(state)


def build_from_checkpoint(ckpt_dir: "str | Path", **overrides):
    """This rank's model of a converted checkpoint, built with its recorded spec and dtype, weights loaded."""
    meta = read_sidecar(ckpt_dir)
    overrides.setdefault("params_dtype", getattr(torch, meta["dtype"]))
    overrides.setdefault("transformer_impl", meta["transformer_impl"])
    model = build_model(Path(ckpt_dir) / HF_SUBDIR, perform_initialization=False, **overrides)
    load_megatron_checkpoint(model, ckpt_dir)
    return model


def convert_hf_to_megatron(hf_dir: "str | Path", out_dir: "str | Path", progress: bool = True, **overrides) -> None:
    """HF folder -> torch_dist checkpoint at the current parallel state (every rank calls it; each reads and holds
    only its own shards). Weights keep the HF dtype unless ``params_dtype`` is overridden."""
    arch = Qwen3Arch.from_hf(hf_dir)
    overrides.setdefault("params_dtype", arch.dtype)
    model = build_model(hf_dir, perform_initialization=False, **overrides)
    load_hf_weights(model, hf_dir, progress=progress)
    save_megatron_checkpoint(model, out_dir, hf_dir)


def export_megatron_to_hf(ckpt_dir: "str | Path", out_dir: "str | Path", progress: bool = True,
                          max_shard_bytes: int = 5 * 2**30) -> None:
    """torch_dist checkpoint from ``convert_hf_to_megatron`` or the trainer -> HF folder (every rank calls it)."""
    model = build_from_checkpoint(ckpt_dir)
    save_hf_checkpoint(model, out_dir, Path(ckpt_dir) / HF_SUBDIR, max_shard_bytes, progress)


def _spawned(rank: int, world: int, port: int, tp: int, pp: int, fn, args, kwargs) -> None:
    from megatron_bpd import parallel

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    parallel.initialize(tp=tp, pp=pp)
    try:
        fn(*args, **kwargs)
    finally:
        parallel.destroy()


def run_parallel(fn, tp: int, pp: int, *args, **kwargs) -> None:
    """Run ``fn(*args, **kwargs)`` on every rank of a tp x pp layout: in place under torchrun, else on tp*pp spawned
    local processes (gloo on CPU, one GPU each where there are enough)."""
    if "RANK" in os.environ:
        from megatron_bpd import parallel

        parallel.initialize(tp=tp, pp=pp)
        fn(*args, **kwargs)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(tp * pp, port, tp, pp, fn, args, kwargs), nprocs=tp * pp, join=True)
