"""Pure-Python parts of the rollout layer: batch types, reuse schedule, masks, weight-update payloads."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bpd.rollout import GenerateOutput, ProtocolError, TeacherScores, TrajectoryBatch, special_token_mask
from megatron_bpd.rollout.reuse import reuse_schedule
from megatron_bpd.rollout.rollout import behavior_logprobs
from megatron_bpd.rollout.weight_sync import UpdateGroup, bucket_named_tensors, update_payload


def make_batch():
    return TrajectoryBatch(prompt_ids=[[1, 2, 3], [4, 5]], response_ids=[[6, 7], [8, 9, 10]],
                           behavior_logprobs=[[-0.5, -1.0], [-0.1, -0.2, -0.3]], loss_mask=[[1, 0], [1, 1, 1]],
                           finish_reason=["stop", "length"], weight_version=["3", "3"], prompt_index=[0, 1])


def test_select_keeps_every_field_of_the_chosen_trajectories():
    short = make_batch().select([1, 0]).select([1])
    assert short.prompt_ids == [[1, 2, 3]] and short.response_ids == [[6, 7]] and short.finish_reason == ["stop"]
    assert short.behavior_logprobs == [[-0.5, -1.0]] and short.loss_mask == [[1, 0]] and short.prompt_index == [0]


def test_batch_validation_names_the_problem():
    with pytest.raises(ValueError, match="trajectory 0: 2 response tokens, 1 log-probs"):
        TrajectoryBatch([[1]], [[2, 3]], [[-1.0]], [[1, 1]], ["stop"], ["0"], [0])
    with pytest.raises(ValueError, match="unknown finish reasons"):
        TrajectoryBatch([[1]], [[2]], [[-1.0]], [[1]], ["eos"], ["0"], [0])


def test_teacher_scores_validate_their_shapes():
    scores = TeacherScores([torch.tensor([-1.0, -2.0])], [torch.tensor([[6, 1], [7, 2]])], [torch.full((2, 2), -0.5)])
    assert scores.top_k == 2
    with pytest.raises(ValueError, match=r"\[T\], \[T, K\], \[T, K\]"):
        TeacherScores([torch.zeros(2)], [torch.zeros(3, 2)], [torch.zeros(3, 2)])


def test_special_token_mask_first_occurrences():
    assert special_token_mask([5, 1, 5, 2, 1, 9], [1, 5, 7]) == [0, 0, 1, 1, 1, 1]
    assert special_token_mask([], [1]) == []


def output(ids, entries):
    return GenerateOutput.from_json({"text": "", "output_ids": ids, "meta_info": {
        "id": "r", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 1,
        "completion_tokens": len(ids), "weight_version": "0", "output_token_logprobs": entries}})


def test_behavior_logprobs_checks():
    assert behavior_logprobs(output([4, 2], [[-0.1, 4, None], [-2.0, 2, None]])) == [-0.1, -2.0]
    with pytest.raises(ProtocolError, match="do not match"):
        behavior_logprobs(output([4, 2], [[-0.1, 4, None]]))
    with pytest.raises(ProtocolError, match="not a finite number"):
        behavior_logprobs(output([4], [[float("nan"), 4, None]]))
    with pytest.raises(ProtocolError, match="missing"):
        behavior_logprobs(output([4], None))
    with pytest.raises(ProtocolError, match="completion_tokens"):
        GenerateOutput.from_json({"output_ids": [1], "meta_info": {"id": "x", "finish_reason": {"type": "length"},
                                                                    "prompt_tokens": 1, "completion_tokens": 2}})


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_reuse_schedule_covers_every_trajectory_once_per_epoch(per_minibatch, minibatches, epochs, seed):
    n = per_minibatch * minibatches
    steps = list(reuse_schedule(n, epochs, minibatches, seed))
    assert [(mb.epoch, mb.index) for mb in steps] == [(e, m) for e in range(epochs) for m in range(minibatches)]
    for e in range(epochs):
        assert sorted(i for mb in steps if mb.epoch == e for i in mb.rows) == list(range(n))
    assert all(len(mb.rows) == per_minibatch and mb.rows == sorted(mb.rows) for mb in steps)
    assert steps == list(reuse_schedule(n, epochs, minibatches, seed))  # seeded


def test_reuse_schedule_is_the_trainers_shuffle_and_rejects_uneven_minibatches():
    """Epoch after epoch one random.Random(seed) shuffles the order that is cut into mini-batches (the trainer's
    schedule since its first run: changing it changes every trained number)."""
    rng, order = random.Random(11), []
    for _ in range(2):
        order.append(list(range(8)))
        rng.shuffle(order[-1])
    expected = [sorted(o[m * 4:(m + 1) * 4]) for o in order for m in range(2)]
    assert [mb.rows for mb in reuse_schedule(8, 2, 2, 11)] == expected
    assert expected[0] + expected[1] != expected[2] + expected[3]
    with pytest.raises(ValueError, match="cannot fill 1 epochs x 3 equal mini-batches"):
        list(reuse_schedule(8, 1, 3, 0))


def test_distributed_update_payloads():
    group = UpdateGroup("10.0.0.1", 29600, server_tp_sizes=[2, 4, 1], group_name="g")
    payloads = group.init_payloads()
    assert group.world_size == 8
    assert [p["rank_offset"] for p in payloads] == [1, 3, 7]
    assert payloads[0] == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1, "world_size": 8,
                           "group_name": "g", "backend": "nccl"}
    tensors = [("a", torch.zeros(4, 4, dtype=torch.bfloat16)), ("b", torch.zeros(8)), ("c", torch.zeros(2, 3))]
    buckets = list(bucket_named_tensors(tensors, bucket_bytes=40))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b"], ["c"]]
    assert [[n for n, _ in b] for b in bucket_named_tensors(tensors, 1 << 20)] == [["a", "b", "c"]]
    body = update_payload(tensors, "g", "7")
    assert body == {"names": ["a", "b", "c"], "dtypes": ["bfloat16", "float32", "float32"],
                    "shapes": [[4, 4], [8], [2, 3]], "group_name": "g", "flush_cache": False,
                    "abort_all_requests": False, "weight_version": "7"}
