"""Forward-only passes through Megatron's schedule: the student's log-probs before the first update ("old"
log-probs) and the scores of a teacher that runs inside the trainer. Results live on the last pipeline stage,
where the loss needs them, gathered back to whole sequences over the CP group."""

from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..parallel.context_parallel import cp_positions
from .batch import MicroBatch


@torch.no_grad()
def forward_only(model, batches: List[MicroBatch], fn: Callable[[torch.Tensor, MicroBatch], Dict[str, torch.Tensor]],
                 seq_len: int) -> List[Dict[str, torch.Tensor]]:
    """Run ``model`` on CP-split ``batches``; on the last stage return ``fn(logits, batch)`` of each micro-batch
    (other stages: [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        logits = model_chunk(batch.tokens, batch.position_ids, attention_mask=None)
        return logits, lambda output: (output.new_zeros(()), fn(output, batch))

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                      num_microbatches=len(batches), seq_length=seq_len,
                                      micro_batch_size=batches[0].tokens.shape[0], forward_only=True)
    return list(out) if parallel_state.is_pipeline_last_stage() else []


def gather_cp(local: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[b, seq_len / cp, ...]`` shares of every CP rank -> ``[b, seq_len, ...]`` in sequence order."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return local
    shares = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(shares, local.contiguous(), group=parallel_state.get_context_parallel_group())
    full = local.new_empty((local.shape[0], seq_len, *local.shape[2:]))
    for rank, share in enumerate(shares):
        index, _ = cp_positions((local.shape[0], seq_len), cp, rank, device=local.device)
        full[:, index] = share
    return full
