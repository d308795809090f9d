"""One call that sets up torch.distributed, Megatron-Core's parallel state and seeds, on GPUs or on the CPU."""

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the parallel dimensions; ``dp`` is derived as world / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        model = self.tp * self.pp * self.cp
        if world_size % model:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}")
        return world_size // model


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    """Join the torchrun job described by the environment, or start a single-process group."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # a plain single process: a one-member group on a free local port
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initialize(tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234, timeout_minutes: int = 30) -> ParallelLayout:
    """Initialize torch.distributed (gloo without CUDA, NCCL with), Megatron's parallel state and the seeds.

    Works under torchrun and in a single plain process. Without a CUDA device the CPU shim is applied
    (``megatron_bpd.parallel.cpu_shim``). Calling it again with the same sizes is a no-op; with other sizes the
    model-parallel state is rebuilt.
    """
    from megatron.core import parallel_state

    from .cpu_shim import apply_cpu_shim

    layout = ParallelLayout(tp, pp, cp)
    _init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout_minutes)
    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
            and parallel_state.get_context_parallel_world_size() == cp
        )
        if same:
            return layout
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    if not apply_cpu_shim(seed):
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def compute_device() -> torch.device:
    """The device this rank computes on: its CUDA device (``initialize`` selects LOCAL_RANK's) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group (tests, end of a run)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
