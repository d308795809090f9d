"""Training checkpoints: Megatron distributed checkpoint (torch_dist) of the model and the optimizer, every rank's
RNG states, the trainer's own state (step, data position, weight version) and, with overlapped rollouts, the
finished rollouts of the next steps (``rollouts.pt``) in ``DIR/step_NNNNNN``. Everything but the Megatron part is
read with ``torch.load(weights_only=True)`` or as JSON: loading a checkpoint never unpickles code.

``DIR/latest`` names the newest complete checkpoint; it is written last, so a crash while saving leaves the
previous one in force.
"""

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..rollout.producer import save_rollouts

LATEST = "latest"
ROLLOUTS_FILE = "rollouts.pt"


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    from ..models.qwen3.model import unwrap

    model_state = unwrap(model).sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: dict, rollouts=None) -> Path:
    """Save everything needed to continue exactly after ``step``; returns the checkpoint folder. ``rollouts``
    (rank 0): the StepRollouts already sampled for the steps after ``step``."""
    from megatron.core import dist_checkpointing

    path = Path(root) / f"step_{step:06d}"
    rank = dist.get_rank()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(path))
    save_rng(path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        if rollouts:
            save_rollouts(rollouts, path / ROLLOUTS_FILE)
        (path / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        (Path(root) / LATEST).write_text(path.name)
    dist.barrier()
    return path


def latest_checkpoint(root: Optional[str]) -> Optional[Path]:
    if root is None or not (Path(root) / LATEST).is_file():
        return None
    return Path(root) / (Path(root) / LATEST).read_text().strip()


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state (with "step")."""
    from megatron.core import dist_checkpointing

    from ..models.qwen3.model import unwrap

    state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True), str(path))
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: resume with the world size the checkpoint was saved at")
    load_rng(rng_file)
    return json.loads((path / "trainer_state.json").read_text())


def save_rng(file: Path) -> None:
    """This process's Python, NumPy and torch CPU RNG states as tensors and plain numbers (no pickled objects), so
    that ``load_rng`` reads them with ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    torch.save({"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
                "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "torch": torch.get_rng_state()}, file)


def load_rng(file: Path) -> None:
    """Restore what ``save_rng`` wrote; the file is read with ``weights_only=True`` (never unpickles code)."""
    rng = torch.load(file, weights_only=True)
    py, npy = rng["python"], rng["numpy"]
    if not (isinstance(py, dict) and isinstance(npy, dict)):  # readable when a library allowlisted NumPy types
        raise ValueError(f"{file}: RNG state in the old pickled format (tuples / NumPy arrays), not save_rng's")
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
