"""Make megatron-core run on a machine without CUDA (tests and the CPU demo over gloo).

megatron-core calls a few CUDA-only functions even for CPU tensors: ``torch.cuda.current_device()`` (rotary
``inv_freq``, ``GlobalMemoryBuffer``), ``torch.cuda.synchronize()`` (p2p, dist-checkpoint saving), literal
``device="cuda"`` keywords (default causal mask, zeros in pipeline schedules), ``torch.cuda.current_stream()``
(DDP's gradient buckets wait on it) and the CUDA RNG tracker's ``fork``.
The shim redirects exactly those to the CPU. It is applied only when no CUDA device exists and never on a GPU.
"""

import torch
from torch.overrides import TorchFunctionMode

_applied = False


class _NullStream:
    """Stands in for the current CUDA stream: CPU work is synchronous, so there is nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites a ``device=`` keyword naming CUDA to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def apply_cpu_shim(seed: int) -> bool:
    """Apply the shim once if CUDA is unavailable; returns whether the process runs under it.

    ``seed`` seeds megatron's model-parallel RNG tracker; on CPU a tracker whose ``fork`` is a no-op is installed
    (correct for dropout 0, which is what megatron-bpd uses: distillation runs without dropout).
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.current_stream = lambda device=None: _NullStream()
        _CudaDeviceToCpu().__enter__()  # process-wide: megatron creates CUDA tensors at arbitrary call sites
        _applied = True
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    return True


def cpu_shim_applied() -> bool:
    return _applied
