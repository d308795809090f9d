"""Megatron-Core's context-parallel (CP) layout of sequences, and the reductions of the gate and the drift controls.

Megatron splits every sequence into 2*CP equal chunks and gives CP rank r the chunks r and 2*CP-1-r (so causal
attention work is balanced), for padded ``[b, s, ...]`` batches along the sequence dim and for packed THD batches
per sequence (each sequence's length a multiple of 2*CP). ``cp_positions`` gives the global positions a rank
holds; every tensor of a micro-batch (tokens, log-probs, masks, the gate's ``segment_ids``) is split with them.
"""

import torch
import torch.distributed as dist


def _check_divisible(length: int, cp_size: int, what: str) -> None:
    if length % (2 * cp_size):
        raise ValueError(f"{what} {length} is not divisible by 2*CP = {2 * cp_size}: pad the sequences to a multiple "
                         f"of {2 * cp_size} for context parallelism")


def cp_chunk_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """[seq_len / cp_size] int64: positions of one sequence held by ``cp_rank`` (chunks r and 2*CP-1-r)."""
    _check_divisible(seq_len, cp_size, "sequence length")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def cp_positions(shape, cp_size: int, cp_rank: int, cu_seqlens=None, device=None):
    """Positions held by ``cp_rank``: ``(index, local_cu_seqlens)``.

    Padded ``shape = [b, s]``: ``index`` [s / cp] along the sequence dim (``local_cu_seqlens`` None).
    Packed ``shape = [n]`` with ``cu_seqlens`` [num_seqs + 1]: ``index`` [n / cp] into the packed dim, and the
    packed boundaries of the local sequences (``cu_seqlens / cp``).
    """
    if len(shape) == 2:
        return cp_chunk_positions(shape[1], cp_size, cp_rank, device), None
    if cu_seqlens is None:
        raise ValueError("packed [n] inputs need cu_seqlens for the context-parallel split")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    parts = []
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        _check_divisible(end - start, cp_size, f"length of packed sequence {i}:")
        parts.append(start + cp_chunk_positions(end - start, cp_size, cp_rank, device))
    index = torch.cat(parts) if parts else cu.new_zeros(0)
    return index, (cu // cp_size).to(cu_seqlens.dtype)


def split_for_cp(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
    """This rank's share of ``tensor`` along ``seq_dim`` (1 for padded ``[b, s, ...]``, 0 for packed ``[n, ...]``)."""
    return tensor.index_select(seq_dim, index.to(tensor.device))


def group_sum(group):
    """An in-place sum of a tensor over ``group`` (None or a one-member group: nothing to do)."""
    if group is None or dist.get_world_size(group) == 1:
        return None

    def reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

    return reduce


def group_cat(values: torch.Tensor, group=None) -> torch.Tensor:
    """The 1-D ``values`` of every rank of ``group`` concatenated in rank order (CPU; None or a one-member group:
    ``values`` itself), for a statistic that needs every value of a batch split over ranks (a quantile, a sort)."""
    local = values.detach().cpu()
    if group is None or dist.get_world_size(group) == 1:
        return local
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    return torch.cat(parts)
