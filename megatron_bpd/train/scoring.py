"""Forward-only passes through Megatron's schedule: the student's log-probs before the first update ("old"
log-probs), the scores of a teacher that runs inside the trainer, the loss's pre-pass and the support-KL probe.
Each reads the ``LMHead`` that the training forward step builds (``forward_step.head_forward``: hidden states and
the output weight shard with ``loss.fused_head``, so no pass holds the logits ``[b, s, V/tp]``). Results live on
the last pipeline stage, where the loss needs them, gathered back to whole sequences over the CP group."""

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..parallel.context_parallel import cp_positions
from ..vocab_parallel import LMHead
from .batch import MicroBatch
from .config import LossConfig
from .forward_step import head_forward


@dataclass(frozen=True)
class ScoringPass:
    """What a no-grad pass computes: ``score(head, batch)`` -> per-position tensors of each micro-batch from its
    ``LMHead``, built as ``loss`` configures the training forward (``fused_head``, ``vocab_size``,
    ``chunk_tokens``)."""

    loss: LossConfig
    score: Callable[[LMHead, MicroBatch], Dict[str, torch.Tensor]]


def logprobs_pass(loss: LossConfig, temperature: float) -> ScoringPass:
    """The labels' log-probs at ``temperature`` ("lp" ``[b, s]``): the student's old log-probs, recomputed."""
    return ScoringPass(loss, lambda head, batch: {"lp": head.logprobs(batch.labels, temperature)})


def teacher_pass(loss: LossConfig, k: int) -> ScoringPass:
    """An in-trainer teacher's scores at temperature 1: the labels' log-probs ("lp" ``[b, s]``) and its top-``k``
    log-probs ("top") and ids ("ids"), ``[b, s, k]``, from one pass over the vocabulary."""

    def score(head: LMHead, batch: MicroBatch) -> Dict[str, torch.Tensor]:
        values, ids, lp = head.topk(k, logprobs_at=batch.labels)
        return {"lp": lp, "ids": ids, "top": values}

    return ScoringPass(loss, score)


@torch.no_grad()
def forward_only(model, batches: List[MicroBatch], scoring: ScoringPass, seq_len: int) -> List[Dict[str, torch.Tensor]]:
    """Run ``model`` on CP-split ``batches``; on the last stage return ``scoring.score(head, batch)`` of each
    micro-batch (other stages: [])."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output, head_of = head_forward(model_chunk, batch, scoring.loss)
        return output, lambda out: (out.new_zeros(()), scoring.score(head_of(out), batch))

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
