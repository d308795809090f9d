"""Training checkpoints: Megatron distributed checkpoint (torch_dist) of the model and the optimizer, every rank's
RNG states and the trainer's own state (step, data position, weight version) in ``DIR/step_NNNNNN``.

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

LATEST = "latest"


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    from ..models.qwen3.model import unwrap

    model_state = unwrap(model).sharded_state_dict()
    return {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(root: str, step: int, model, optimizer, trainer_state: dict) -> Path:
    """Save everything needed to continue exactly after ``step``; returns the checkpoint folder."""
    from megatron.core import dist_checkpointing

    path = Path(root) / f"step_{step:06d}"
    rank = dist.get_rank()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, is_loading=False), str(path))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               path / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
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
    rng = torch.load(rng_file, weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "trainer_state.json").read_text())
