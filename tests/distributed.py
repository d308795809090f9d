"""Run a function on N real torch.distributed processes (gloo over loopback) and collect what each returns.

Usage in a test: ``results = run_distributed(fn, world_size, *args)`` where ``fn`` is a module-level function
(picklable by reference) called as ``fn(rank, world_size, *args)`` in every process; ``results[rank]`` is its
return value. A failure in any process fails the test with that process's traceback.
"""

import io
import os
import traceback

import torch
import torch.multiprocessing as mp

from megatron_bpd.rollout.embedded import free_port


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        buffer = io.BytesIO()  # plain bytes: tensors shared through file descriptors die with the worker
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report every failure, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=300):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{payload}")
                break
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
