"""Streaming access to Hugging Face safetensors checkpoints: a reader of single or sharded (indexed) folders that
reads only the requested rows/columns, and a writer that flushes size-bounded shards with an index."""

import json
import shutil
from pathlib import Path

import torch

# Files of an HF model folder that travel with the weights (tokenizer, chat template, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")


def copy_side_files(src: "str | Path", dst: "str | Path") -> "list[str]":
    """Copy the tokenizer / generation files of ``src`` that exist into ``dst``; returns their names."""
    copied = [name for name in SIDE_FILES if (Path(src) / name).is_file()]
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return copied


class HFReader:
    """Tensors of an HF folder holding ``model.safetensors`` or ``model.safetensors.index.json`` + shards."""

    def __init__(self, hf_dir: "str | Path"):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                files = {name: "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir} holds neither model.safetensors nor model.safetensors.index.json")
        for name in set(files.values()):
            if not (self.dir / name).is_file():
                raise FileNotFoundError(f"{index} names shard {name}, which is missing")
        self.files = files  # tensor name -> file name
        self._open = {}

    def _handle(self, name: str):
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(self.dir / file, framework="pt")
        return self._open[file]

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor ``name``; only those bytes are read."""
        part = self._handle(name).get_slice(name)
        return part[start:stop] if dim == 0 else part[:, start:stop]

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.files.values()))


class HFWriter:
    """Writes tensors as ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json`` (a single ``model.safetensors`` when everything fits in one shard)."""

    def __init__(self, out_dir: "str | Path", max_shard_bytes: int = 5 * 2**30):
        self.dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pending, self._pending_bytes, self._shards, self.total_bytes = {}, 0, [], 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().cpu().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.dir / f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{len(self._shards):05d}.safetensors"
            path.rename(self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
