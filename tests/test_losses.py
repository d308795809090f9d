"""The OPD losses against straightforward float64 implementations of method.md (position by position)."""

import math

import pytest
import torch

from megatron_bpd.gating import GateConfig, drift_gates
from megatron_bpd.losses import (gated_mean, ppo_metrics, ppo_terms, sampled_token_opd_loss,
                                top_entropy_mask, topk_lsm_loss)


def reference_sampled_token(cur, old, teacher, mask, gates, eps_low=0.2, eps_high=0.2, adv_clip=5.0, dual=None):
    """method.md: A = clamp(teach - old), r = exp(cur - old), l = -min(rA, clip(r)A); sum m g l / sum m.
    ``dual`` c (dual-clip PPO): l = min(l, -cA) where A < 0."""
    total, count = 0.0, 0.0
    for t in range(len(cur)):
        if not mask[t]:
            continue
        a = min(max(teacher[t] - old[t], -adv_clip), adv_clip)
        r = math.exp(cur[t] - old[t])
        l = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
        if dual is not None and a < 0:
            l = min(l, -dual * a)
        total += gates[t] * l
        count += 1
    return total / (count + 1e-8)


def reference_lsm(student_logits, teacher_logp, mask, gates, clip=5.0):
    """method.md: renormalize both over the K support entries, l = sum p~s (clamp(log p~s - log p~q))."""
    total, count = 0.0, 0.0
    for t in range(len(mask)):
        if not mask[t]:
            continue
        zs = math.log(sum(math.exp(x) for x in student_logits[t]))
        zq = math.log(sum(math.exp(x) for x in teacher_logp[t]))
        l = 0.0
        for s, q in zip(student_logits[t], teacher_logp[t]):
            ls, lq = s - zs, q - zq
            l += math.exp(ls) * min(max(ls - lq, -clip), clip)
        total += gates[t] * l
        count += 1
    return total / (count + 1e-8)


def random_case(seed, n=40, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    cur = old + spread * torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    teacher = -torch.rand(n, generator=g, dtype=torch.float64) * 8  # some advantages beyond the clamp
    mask = torch.rand(n, generator=g) < 0.8
    gates = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return cur, old, teacher, mask, gates


@pytest.mark.parametrize("dual", [None, 2.0])
@pytest.mark.parametrize("seed", range(5))
def test_sampled_token_loss_value_and_gradient(seed, dual):
    cur, old, teacher, mask, gates = random_case(seed, spread=1.0 if dual is None else 4.0)
    if dual is not None:  # the dual clip binds at some valid positions: A < 0 and r > c
        assert bool((mask & (teacher - old < 0) & (cur - old > math.log(dual))).any())
    cur = cur.requires_grad_()
    loss, metrics = sampled_token_opd_loss(cur, old, teacher, mask, gates, clip_eps=(0.2, 0.28), dual_clip=dual)
    expected = reference_sampled_token(cur.tolist(), old.tolist(), teacher.tolist(), mask.tolist(),
                                       gates.tolist(), eps_high=0.28, dual=dual)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    loss.backward()
    # Numerical gradient of the reference, position by position.
    h = 1e-6
    for t in range(len(cur)):
        up, down = cur.detach().clone(), cur.detach().clone()
        up[t] += h
        down[t] -= h
        num = (reference_sampled_token(up.tolist(), old.tolist(), teacher.tolist(), mask.tolist(), gates.tolist(),
                                       eps_high=0.28, dual=dual)
               - reference_sampled_token(down.tolist(), old.tolist(), teacher.tolist(), mask.tolist(),
                                         gates.tolist(), eps_high=0.28, dual=dual)) / (2 * h)
        assert cur.grad[t].item() == pytest.approx(num, abs=1e-5), t
    assert 0.0 <= metrics["pg_clipfrac"].item() <= 1.0
    alone = ppo_metrics(ppo_terms(cur.detach(), old, teacher, mask, clip_eps=(0.2, 0.28)), mask, dual_clip=dual)
    assert alone.keys() == metrics.keys() and all(torch.equal(alone[k], metrics[k]) for k in alone)
    valid = mask.nonzero().reshape(-1).tolist()
    ratio = [math.exp(cur[t].item() - old[t].item()) for t in valid]
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratio) / len(valid), rel=1e-9)
    assert metrics["approx_kl_old_cur"].item() == pytest.approx(
        sum(old[t].item() - cur[t].item() for t in valid) / len(valid), rel=1e-9, abs=1e-12)
    if dual is not None:
        held = sum(1 for t in valid if teacher[t] - old[t] < 0 and cur[t].item() - old[t].item() > math.log(dual))
        assert metrics["dual_clipfrac"].item() == pytest.approx(held / len(valid)) and held > 0
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            sampled_token_opd_loss(cur, old, teacher, mask, dual_clip=1.0)


@pytest.mark.parametrize("seed", range(5))
def test_lsm_loss_value_and_gradient(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 12, 6
    student = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 4, -1) - 0.5
    mask = torch.rand(n, generator=g) < 0.75
    gates = torch.rand(n, generator=g, dtype=torch.float64) * 2
    loss, _ = topk_lsm_loss(student, teacher, mask, gates, log_ratio_clip=2.0)
    expected = reference_lsm(student.tolist(), teacher.tolist(), mask.tolist(), gates.tolist(), clip=2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-8)
    loss.backward()
    h = 1e-6
    for t in range(n):
        for j in range(k):
            up, down = student.detach().clone(), student.detach().clone()
            up[t, j] += h
            down[t, j] -= h
            num = (reference_lsm(up.tolist(), teacher.tolist(), mask.tolist(), gates.tolist(), clip=2.0)
                   - reference_lsm(down.tolist(), teacher.tolist(), mask.tolist(), gates.tolist(), clip=2.0)) / (2 * h)
            assert student.grad[t, j].item() == pytest.approx(num, abs=1e-5)


def test_lsm_zero_when_student_matches_teacher_on_support():
    teacher = torch.log_softmax(torch.randn(5, 4, dtype=torch.float64), -1) - 1.0  # mass outside the support
    student = teacher + 3.0  # same distribution after renormalization
    loss, _ = topk_lsm_loss(student, teacher, torch.ones(5, dtype=torch.bool))
    assert abs(loss.item()) < 1e-12


def test_lsm_support_mask_equals_smaller_support():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.ones(4, dtype=torch.bool)
    support = torch.ones(4, 5, dtype=torch.bool)
    support[:, -1] = False
    full, _ = topk_lsm_loss(student, teacher, mask, support_mask=support)
    small, _ = topk_lsm_loss(student[:, :-1], teacher[:, :-1], mask)
    assert full.item() == pytest.approx(small.item(), abs=1e-6)


def test_all_ones_gates_equal_ungated_loss():
    cur, old, teacher, mask, _ = random_case(11)
    ones = torch.ones_like(cur)
    assert sampled_token_opd_loss(cur, old, teacher, mask, ones)[0].item() == \
        sampled_token_opd_loss(cur, old, teacher, mask)[0].item()
    s, q = torch.randn(40, 4), torch.randn(40, 4)
    assert topk_lsm_loss(s, q, mask, ones)[0].item() == topk_lsm_loss(s, q, mask)[0].item()


def test_gates_inert_on_fresh_rollout():
    """cur == old: every gate is 1, the gated loss equals the ungated one, the ratio is 1."""
    _, old, teacher, mask, _ = random_case(5)
    cur = old.clone()
    gates, stats = drift_gates(cur.view(4, 10), old.view(4, 10), mask.view(4, 10), GateConfig(block_size=3))
    assert torch.equal(gates, torch.ones(4, 10))
    gated, metrics = sampled_token_opd_loss(cur, old, teacher, mask, gates.view(-1))
    assert gated.item() == sampled_token_opd_loss(cur, old, teacher, mask)[0].item()
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_gates_are_detached_from_the_loss():
    cur, old, teacher, mask, _ = random_case(2, spread=3.0)
    cur = cur.requires_grad_()
    gates, _ = drift_gates(cur.view(4, 10), old.view(4, 10), mask.view(4, 10), GateConfig(block_size=4))
    assert not gates.requires_grad
    loss, _ = sampled_token_opd_loss(cur, old, teacher, mask, gates.view(-1).to(cur.dtype))
    (grad,) = torch.autograd.grad(loss, cur)
    fixed = gates.view(-1).to(cur.dtype).clone()
    loss2, _ = sampled_token_opd_loss(cur, old, teacher, mask, fixed)
    (grad2,) = torch.autograd.grad(loss2, cur)
    assert torch.equal(grad, grad2)


def test_global_token_count_makes_microbatch_losses_add_up():
    cur, old, teacher, mask, gates = random_case(8)
    whole, _ = sampled_token_opd_loss(cur, old, teacher, mask, gates)
    n = mask.sum()
    parts = sum(sampled_token_opd_loss(cur[i:i + 10], old[i:i + 10], teacher[i:i + 10], mask[i:i + 10],
                                       gates[i:i + 10], num_tokens=n)[0] for i in range(0, 40, 10))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-9)


def test_nan_at_masked_position_is_ignored_and_at_valid_position_raises():
    cur, old, teacher, mask, _ = random_case(4)
    mask[3] = False
    teacher[3] = float("nan")
    cur[3] = float("inf")
    loss, _ = sampled_token_opd_loss(cur, old, teacher, mask)
    assert torch.isfinite(loss)
    mask[3] = True
    with pytest.raises(ValueError, match=r"non-finite cur_logprobs at valid position \[3\]"):
        sampled_token_opd_loss(cur, old, teacher, mask)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="shapes differ"):
        sampled_token_opd_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), torch.ones(3))
    with pytest.raises(ValueError, match="loss_mask has shape"):
        topk_lsm_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.ones(4))


def test_empty_mask_gives_zero_not_nan():
    loss = gated_mean(torch.randn(5), torch.zeros(5, dtype=torch.bool))
    assert loss.item() == 0.0


def test_top_entropy_mask_keeps_highest_fraction():
    entropy = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 1.0])
    mask = torch.ones(10, dtype=torch.bool)
    mask[9] = False
    kept = top_entropy_mask(entropy, mask, fraction=0.2)
    assert kept.nonzero().reshape(-1).tolist() == [1, 5]
