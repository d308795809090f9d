"""A step's rollout as per-trajectory arrays, and the padded micro-batches the schedule consumes.

Trajectory b has prompt x (P_b tokens) and response y (T_b tokens). Every per-response array here is ``[T_b]``
(``[T_b, K]`` for top-K); in a micro-batch, response token t sits at label position P_b - 1 + t, because the
model's logits at input position i score token i + 1.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..gating import GateConfig, newline_span_starts, plan_segments
from ..rollout.types import TeacherScores, TrajectoryBatch
from .batch import MicroBatch
from .scoring import gather_cp


@dataclass
class RolloutData:
    """Everything the loss needs about a step's trajectories (identical on every rank but ``old_logprobs`` and
    in-trainer teacher scores, which only the last pipeline stage computes and uses)."""

    trajectories: TrajectoryBatch
    teacher: Optional[TeacherScores] = None
    old_logprobs: Dict[int, torch.Tensor] = field(default_factory=dict)

    def response_mask(self, b: int) -> torch.Tensor:
        return torch.tensor(self.trajectories.loss_mask[b], dtype=torch.bool)

    def num_tokens(self, rows: Sequence[int]) -> torch.Tensor:
        return torch.tensor(sum(sum(self.trajectories.loss_mask[b]) for b in rows), dtype=torch.int64)

    def per_token(self, b: int) -> Dict[str, torch.Tensor]:
        """Trajectory b's per-response arrays that a micro-batch places at label positions, by ``MicroBatch``
        field: the sampler's log-probs, pi_old's where this rank has them, the teacher's scores where there are
        some. A new per-token input of the loss is one more entry here and a ``MicroBatch`` field."""
        arrays = {"behavior_logprobs": torch.tensor(self.trajectories.behavior_logprobs[b])}
        if self.old_logprobs:
            arrays["old_logprobs"] = self.old_logprobs[b]
        if self.teacher is not None:
            arrays.update(teacher_logprobs=self.teacher.token_logprobs[b], teacher_topk_ids=self.teacher.topk_ids[b],
                          teacher_topk_logprobs=self.teacher.topk_logprobs[b])
        return arrays


def padded_length(data: RolloutData, rows: Sequence[int], multiple: int) -> int:
    """Label positions of the longest trajectory of ``rows``, rounded up to ``multiple``."""
    longest = max(len(data.trajectories.prompt_ids[b]) + len(data.trajectories.response_ids[b]) - 1 for b in rows)
    return -(-longest // multiple) * multiple


def micro_batch(data: RolloutData, rows: Sequence[int], seq_len: int, gate: GateConfig, *, pad_id: int = 0,
                newline_ids: Sequence[int] = ()) -> MicroBatch:
    """The padded ``[len(rows), seq_len]`` micro-batch of trajectories ``rows``: tokens, labels, the loss mask, the
    gate's plan and every array of ``RolloutData.per_token`` (zeros outside the responses)."""
    traj, n = data.trajectories, len(rows)
    tokens = torch.full((n, seq_len + 1), pad_id, dtype=torch.int64)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    starts = torch.zeros(n, dtype=torch.int64)
    arrays = [data.per_token(b) for b in rows]
    placed = {name: torch.zeros(n, seq_len, *value.shape[1:],
                                dtype=torch.float32 if value.is_floating_point() else torch.int64)
              for name, value in arrays[0].items()}
    for i, b in enumerate(rows):
        sequence = traj.prompt_ids[b] + traj.response_ids[b]
        if len(sequence) - 1 > seq_len:
            raise ValueError(f"trajectory {b} has {len(sequence) - 1} label positions, micro-batch length {seq_len}")
        tokens[i, :len(sequence)] = torch.tensor(sequence)
        p, t = len(traj.prompt_ids[b]), len(traj.response_ids[b])
        span = slice(p - 1, p - 1 + t)
        starts[i] = p - 1
        mask[i, span] = data.response_mask(b)
        for name, value in arrays[i].items():
            placed[name][i, span] = value
    labels = tokens[:, 1:]
    span_starts = None
    if gate.granularity == "span":
        span_starts = newline_span_starts(labels, newline_ids, min_len=gate.span_min_len, max_len=gate.span_max_len,
                                          fallback_block=gate.span_fallback_block, response_starts=starts)
    plan = plan_segments((n, seq_len), gate, response_starts=starts, span_starts=span_starts)
    return MicroBatch(tokens=tokens[:, :-1], labels=labels, loss_mask=mask, segment_ids=plan.segment_ids, plan=plan,
                      **placed)


@dataclass
class MicroBatcher:
    """A set of a step's trajectories as this rank's micro-batches, and back: DP rank r of D takes rows r, r + D,
    ... in micro-batches of ``size``, all padded to the longest label length of the set (rounded up to 2 x CP),
    each split for this CP rank (``dp``, ``cp``: (rank, world size)) and moved to ``device``."""

    gate: GateConfig
    size: int
    pad_id: int = 0
    newline_ids: Sequence[int] = ()
    dp: Tuple[int, int] = (0, 1)
    cp: Tuple[int, int] = (0, 1)
    device: Union[str, torch.device] = "cpu"

    def __call__(self, data: RolloutData, rows: List[int]) -> Tuple[List[int], List[MicroBatch], int]:
        """(this DP rank's share of ``rows``, its CP-split micro-batches, the padded length)."""
        (dp_rank, dp), (cp_rank, cp) = self.dp, self.cp
        seq_len = padded_length(data, rows, 2 * cp if cp > 1 else 1)
        mine = rows[dp_rank::dp]
        batches = [micro_batch(data, mine[i:i + self.size], seq_len, self.gate, pad_id=self.pad_id,
                               newline_ids=self.newline_ids).split_for_cp(cp, cp_rank).to(self.device)
                   for i in range(0, len(mine), self.size)]
        return mine, batches, seq_len

    def per_trajectory(self, data: RolloutData, mine: List[int], outputs: List[dict], seq_len: int,
                       keys: Optional[Sequence[str]] = None, wanted: Callable[[int], bool] = lambda b: True
                       ) -> Dict[int, Dict[str, torch.Tensor]]:
        """This DP rank's per-micro-batch outputs ``[b, s/cp, ...]`` (the ``keys`` of them, default all) cut into
        per-trajectory response arrays (CPU) of the trajectories ``wanted``: {trajectory: {key: [T_b, ...]}}.
        Every CP rank of the last stage calls it (the CP shares are gathered)."""
        result = {}
        for i, out in enumerate(outputs):
            chunk = mine[i * self.size:(i + 1) * self.size]
            for key in (keys or out.keys()):
                for b, piece in zip(chunk, response_slices(data, chunk, gather_cp(out[key], seq_len))):
                    if wanted(b):
                        result.setdefault(b, {})[key] = piece.cpu()
        return result


def response_slices(data: RolloutData, rows: Sequence[int], per_position: torch.Tensor) -> List[torch.Tensor]:
    """Cut label-aligned ``[len(rows), seq_len, ...]`` values back into per-trajectory ``[T_b, ...]`` arrays."""
    out = []
    for i, b in enumerate(rows):
        p, t = len(data.trajectories.prompt_ids[b]), len(data.trajectories.response_ids[b])
        out.append(per_position[i, p - 1:p - 1 + t])
    return out


def newline_token_ids(tokenizer) -> List[int]:
    """Vocabulary ids whose text contains a newline (the NewlineSpan boundaries)."""
    return [i for token, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([token])]
