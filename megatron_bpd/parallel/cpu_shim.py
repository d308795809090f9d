"""Make megatron-core run on a machine without CUDA (tests and the CPU demo over gloo).

megatron-core calls a few CUDA-only functions even for CPU tensors: ``torch.cuda.current_device()`` (rotary
``inv_freq``, ``GlobalMemoryBuffer``), ``torch.cuda.synchronize()`` (p2p, dist-checkpoint saving), literal
``device="cuda"`` keywords (default causal mask, zeros in pipeline schedules), ``torch.cuda.current_stream()``
(DDP's gradient buckets wait on it), the CUDA RNG tracker's ``fork``, and the optimizer's gradient clipping,
which asserts CUDA tensors (replaced by the same scaling, ``grad *= min(1, max_norm / (total_norm + 1e-6))``).
The shim redirects exactly those to the CPU. It is applied only when no CUDA device exists and never on a GPU.
"""

import contextlib

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


@torch.no_grad()
def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 for CPU tensors (same arithmetic)."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    coeff = torch.as_tensor(max_norm / (total_norm + 1.0e-6)).clamp(max=1.0)
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.mul_(coeff.to(grad.dtype))


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
        from megatron.core.optimizer import optimizer

        optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
        _applied = True
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    return True


def cpu_shim_applied() -> bool:
    return _applied


@contextlib.contextmanager
def tensor_cuda_is_noop_on_cpu():
    """Without CUDA, ``Tensor.cuda()`` returns the tensor inside this block: GPTModel's constructor syncs the two
    copies of tied embeddings across pipeline stages with ``weight.data.cuda()`` (PP > 1)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
