"""Serving one rollout batch for several optimizer steps: E epochs x M mini-batches of trajectory indices, each
epoch a fresh seeded shuffle (the trainer cuts each mini-batch into micro-batches, ``train.rollout_data``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step: mini-batch ``index`` of reuse epoch ``epoch``, on the trajectories ``rows`` (sorted)."""

    epoch: int
    index: int
    rows: list[int]


def reuse_schedule(num_trajectories: int, epochs: int, minibatches: int, seed: int) -> Iterator[MiniBatch]:
    """The ``epochs`` x ``minibatches`` optimizer steps of one rollout batch: each epoch shuffles the trajectory
    indices (one ``random.Random(seed)`` for all epochs) and cuts the order into ``minibatches`` equal parts."""
    if epochs < 1 or minibatches < 1 or num_trajectories % minibatches:
        raise ValueError(f"{num_trajectories} trajectories cannot fill {epochs} epochs x {minibatches} equal "
                         f"mini-batches")
    rng, size = random.Random(seed), num_trajectories // minibatches
    for epoch in range(epochs):
        order = list(range(num_trajectories))
        rng.shuffle(order)
        for index in range(minibatches):
            yield MiniBatch(epoch, index, sorted(order[index * size:(index + 1) * size]))
