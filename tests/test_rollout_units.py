"""Pure-Python parts of the rollout layer: batch views, reuse schedule, masks, weight-update payloads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_bpd.rollout import GenerateOutput, ProtocolError, TeacherScores, TrajectoryBatch, special_token_mask
from megatron_bpd.rollout.reuse import ReuseBuffer, pack
from megatron_bpd.rollout.rollout import behavior_logprobs
from megatron_bpd.rollout.weight_sync import UpdateGroup, bucket_named_tensors, update_payload


def make_batch():
    return TrajectoryBatch(prompt_ids=[[1, 2, 3], [4, 5]], response_ids=[[6, 7], [8, 9, 10]],
                           behavior_logprobs=[[-0.5, -1.0], [-0.1, -0.2, -0.3]], loss_mask=[[1, 0], [1, 1, 1]],
                           finish_reason=["stop", "length"], weight_version=["3", "3"], prompt_index=[0, 1])


def test_packed_and_padded_views_align_tokens():
    batch = make_batch()
    packed = batch.to_packed()
    assert packed.tokens.tolist() == [1, 2, 3, 6, 7, 4, 5, 8, 9, 10]
    assert packed.cu_seqlens.tolist() == [0, 5, 10] and packed.position_ids.tolist() == [0, 1, 2, 3, 4] * 2
    assert packed.loss_mask.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 1, 1]
    assert packed.behavior_logprobs.tolist() == pytest.approx([0, 0, 0, -0.5, -1.0, 0, 0, -0.1, -0.2, -0.3])
    padded = batch.to_padded(pad_id=-1)
    assert padded.tokens.tolist() == [[1, 2, 3, 6, 7], [4, 5, 8, 9, 10]]
    assert padded.attention_mask.all() and padded.loss_mask[0].tolist() == [0, 0, 0, 1, 0]
    short = batch.select([1, 0]).select([1])
    assert short.to_padded().tokens.tolist() == [[1, 2, 3, 6, 7]] and short.finish_reason == ["stop"]


def test_batch_validation_names_the_problem():
    with pytest.raises(ValueError, match="trajectory 0: 2 response tokens, 1 log-probs"):
        TrajectoryBatch([[1]], [[2, 3]], [[-1.0]], [[1, 1]], ["stop"], ["0"], [0])
    with pytest.raises(ValueError, match="unknown finish reasons"):
        TrajectoryBatch([[1]], [[2]], [[-1.0]], [[1]], ["eos"], ["0"], [0])


def test_teacher_scores_packed_alignment():
    batch = make_batch()
    scores = TeacherScores([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0])],
                           [torch.tensor([[6, 1], [7, 2]]), torch.tensor([[8, 0], [9, 0], [10, 0]])],
                           [torch.full((2, 2), -0.5), torch.full((3, 2), -0.7)])
    lp, ids, tlp = scores.to_packed(batch)
    assert lp.tolist() == [0, 0, 0, -1, -2, 0, 0, -3, -4, -5]
    assert ids[:, 0].tolist() == [0, 0, 0, 6, 7, 0, 0, 8, 9, 10]
    assert tlp[:, 0].tolist() == pytest.approx([0, 0, 0, -0.5, -0.5, 0, 0, -0.7, -0.7, -0.7])
    back = TeacherScores.from_packed(batch, lp, ids, tlp)
    for field in ("token_logprobs", "topk_ids", "topk_logprobs"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(back, field), getattr(scores, field)))
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
@given(st.lists(st.integers(1, 50), min_size=4, max_size=40), st.integers(1, 4), st.integers(1, 3))
def test_reuse_buffer_covers_every_trajectory_once_per_epoch(lengths, minibatches, epochs):
    buffer = ReuseBuffer(lengths, epochs=epochs, num_minibatches=minibatches, token_budget=60, seed=3)
    steps = list(buffer)
    assert len(steps) == len(buffer) == epochs * minibatches
    for e in range(epochs):
        seen = [i for mb in steps if mb.epoch == e for i in mb.indices]
        assert sorted(seen) == list(range(len(lengths)))
        sizes = [len(mb.indices) for mb in steps if mb.epoch == e]
        assert max(sizes) - min(sizes) <= 1
    for mb in steps:
        assert all(sum(lengths[i] for i in micro) <= 60 for micro in mb.micro_batches)
    assert [mb.indices for mb in steps] == [mb.indices for mb in buffer]  # seeded


def test_reuse_buffer_shuffles_per_epoch_and_rejects_oversized():
    steps = list(ReuseBuffer([10] * 16, epochs=2, num_minibatches=2, token_budget=40, seed=0))
    assert steps[0].indices + steps[1].indices != steps[2].indices + steps[3].indices
    assert all(len(micro) == 4 for mb in steps for micro in mb.micro_batches)
    with pytest.raises(ValueError, match="more than the token budget"):
        ReuseBuffer([10, 100], token_budget=50)
    assert pack([0, 1, 2], [30, 30, 40], 70) == [[2, 0], [1]]


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
