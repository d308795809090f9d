"""The gate trace (``gate_trace: N``): per update, the per-position drift and gates of the step's first N
trajectories, appended to ``gate_trace.jsonl`` as one line per trajectory:
``{"step", "epoch", "minibatch", "trajectory", "drift": [T_b], "gate": [T_b], "response_ids": [T_b]}``
(values rounded to 5 decimals; the response's token ids let a study measure drift by line)."""

import json
from pathlib import Path
from typing import List

import torch.distributed as dist
from megatron.core import parallel_state as ps

from .rollout_data import MicroBatcher, RolloutData


class GateTrace:
    """Writes ``path`` on rank 0 from the loss outputs ("drift", "gates": ``[b, s/cp]``) of trajectories below
    ``limit``; ``micro_batches`` is the update's micro-batcher (it cuts the outputs back into trajectories)."""

    def __init__(self, path: Path, limit: int, micro_batches: MicroBatcher):
        self.path, self.limit, self.micro_batches = Path(path), limit, micro_batches

    def write(self, step: int, update, data: RolloutData, mine: List[int], outputs: List[dict], seq_len: int) -> None:
        """Append update ``update`` = (epoch, mini-batch) of step ``step`` (``mine``, ``outputs``, ``seq_len``: this
        rank's trajectories, loss outputs and padded length). Collective over all ranks."""
        local = {}
        if ps.is_pipeline_last_stage():
            local = self.micro_batches.per_trajectory(data, mine, outputs, seq_len, ("drift", "gates"),
                                                      lambda b: b < self.limit)
            if ps.get_tensor_model_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
                local = {}
        main = dist.get_rank() == 0
        parts = [None] * dist.get_world_size() if main else None
        dist.gather_object(local, parts, dst=0)
        if not main:
            return
        rounded = lambda t: [round(v, 5) + 0.0 for v in t.tolist()]  # noqa: E731 (+ 0.0: no -0.0)
        with open(self.path, "a") as f:
            for b, values in sorted((b, v) for part in parts for b, v in part.items()):
                f.write(json.dumps({"step": step, "epoch": update[0], "minibatch": update[1], "trajectory": b,
                                    "drift": rounded(values["drift"]), "gate": rounded(values["gates"]),
                                    "response_ids": list(data.trajectories.response_ids[b])}) + "\n")
