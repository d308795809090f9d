"""Process groups and parallel layout: ``initialize`` (torch.distributed + Megatron parallel state + seeds, with
the CPU shim where no CUDA device exists)."""

from .cpu_shim import apply_cpu_shim, cpu_shim_applied
from .initialize import ParallelLayout, compute_device, destroy, initialize, seed_everything

__all__ = ["ParallelLayout", "apply_cpu_shim", "compute_device", "cpu_shim_applied", "destroy", "initialize",
           "seed_everything"]
