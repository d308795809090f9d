"""parallel.initialize: the layouts over gloo on the CPU (with the CPU shim), and (``-m gpu``) NCCL on a GPU with
no shim."""

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed


def _init_and_report(rank, world_size, tp, pp, cp):
    from megatron.core import parallel_state as ps

    from megatron_bpd import parallel

    parallel.initialize(tp=tp, pp=pp, cp=cp, seed=7)
    x = torch.tensor([float(rank)], device=parallel.compute_device())
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    report = dict(
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp=ps.get_data_parallel_world_size(), tp_sum=x.item(),
        shim=parallel.cpu_shim_applied(), current_device=str(torch.cuda.current_device()), backend=dist.get_backend(),
        compute_device=str(parallel.compute_device()), tensor_device=str(x.device),
    )
    parallel.initialize(tp=tp, pp=pp, cp=cp, seed=7)  # idempotent
    parallel.destroy()
    return report


def test_initialize_single_plain_process():
    out = run_distributed(_init_and_report, 1, 1, 1, 1)
    assert out[0]["dp"] == 1 and out[0]["shim"] and out[0]["current_device"] == "cpu"
    assert out[0]["backend"] == "gloo" and out[0]["compute_device"] == out[0]["tensor_device"] == "cpu"


@pytest.mark.gpu
def test_initialize_on_a_gpu_uses_nccl_and_no_cpu_shim():
    out = run_distributed(_init_and_report, 1, 1, 1, 1)
    assert not out[0]["shim"] and out[0]["current_device"] == "0" and out[0]["backend"] == "nccl"
    assert out[0]["compute_device"] == out[0]["tensor_device"] == "cuda:0" and out[0]["tp_sum"] == 0.0


def test_initialize_tp2_cp2_over_gloo():
    out = run_distributed(_init_and_report, 4, 2, 1, 2)
    # Megatron's default order tp-cp-ep-dp-pp: tp is the fastest varying rank dimension, then cp.
    assert [o["tp_rank"] for o in out] == [0, 1, 0, 1]
    assert [o["cp_rank"] for o in out] == [0, 0, 1, 1]
    assert [o["tp_sum"] for o in out] == [1.0, 1.0, 5.0, 5.0]
    assert all(o["dp"] == 1 and o["shim"] for o in out)


def test_world_size_must_divide_layout():
    from megatron_bpd.parallel import ParallelLayout

    with pytest.raises(ValueError, match="not divisible"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(6)
