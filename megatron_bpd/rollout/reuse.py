"""Serving one rollout batch for several optimizer steps: E epochs x M mini-batches, each mini-batch packed into
micro-batches of at most ``token_budget`` tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class MiniBatch:
    """One optimizer step: ``micro_batches`` are lists of trajectory indices (select them from the batch and the
    teacher scores, then ``to_packed()``)."""

    epoch: int
    index: int
    micro_batches: list[list[int]]

    @property
    def indices(self) -> list[int]:
        return [i for mb in self.micro_batches for i in mb]


@dataclass
class ReuseBuffer:
    """Each epoch shuffles the trajectories (seeded by ``seed + epoch``), splits them into ``num_minibatches``
    nearly equal mini-batches, and packs each first-fit-decreasing into micro-batches of <= ``token_budget``
    tokens. ``lengths[i]`` is trajectory i's prompt + response length."""

    lengths: Sequence[int]
    epochs: int = 2
    num_minibatches: int = 1
    token_budget: int = 16384
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"epochs ({self.epochs}) and num_minibatches ({self.num_minibatches}) must be >= 1")
        if len(self.lengths) < self.num_minibatches:
            raise ValueError(f"{len(self.lengths)} trajectories cannot fill {self.num_minibatches} mini-batches")
        too_long = [i for i, n in enumerate(self.lengths) if n > self.token_budget]
        if too_long:
            raise ValueError(f"trajectory {too_long[0]} has {self.lengths[too_long[0]]} tokens, more than the token "
                             f"budget {self.token_budget} of a micro-batch")

    def __len__(self) -> int:
        return self.epochs * self.num_minibatches

    def __iter__(self) -> Iterator[MiniBatch]:
        for epoch in range(self.epochs):
            order = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + epoch))
            for index, chunk in enumerate(torch.tensor_split(order, self.num_minibatches)):
                yield MiniBatch(epoch, index, pack(chunk.tolist(), self.lengths, self.token_budget))


def pack(indices: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: place each trajectory (longest first) into the first micro-batch with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        slot = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return bins
