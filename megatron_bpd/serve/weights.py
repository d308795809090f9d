"""Loading an HF Qwen3 checkpoint and replacing its weights in place (``/update_weights_from_disk``)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) from an HF folder; the tokenizer is optional."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    has_tokenizer = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    return model.eval(), tokenizer


def update_weights_from_disk(model: torch.nn.Module, path: str) -> int:
    """Copy every tensor of the ``*.safetensors`` files under ``path`` into the parameter of the same HF name.

    All names and shapes are checked before anything is copied, so a bad checkpoint leaves the model unchanged.
    Returns the number of tensors loaded. A subset of the parameters may be given (the rest keep their values).
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return load_named_tensors(model, tensors, path)


def load_named_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> int:
    """Copy ``tensors`` (HF names) into the model after checking every name and shape; returns the count."""
    state = model.state_dict()
    for name, tensor in tensors.items():
        if name not in state:
            raise KeyError(f"{source}: tensor {name!r} is not a parameter of the served model")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model has "
                             f"{tuple(state[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            state[name].copy_(tensor)
    return len(tensors)


def receive_weights(group, names: list[str], dtypes: list[str], shapes: list[list[int]]) -> dict[str, torch.Tensor]:
    """Receive the tensors rank 0 of ``group`` broadcasts, in the announced order."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
    out = {}
    for name, dtype, shape in zip(names, dtypes, shapes):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        torch.distributed.broadcast(tensor, src=0, group=group)
        out[name] = tensor
    return out
