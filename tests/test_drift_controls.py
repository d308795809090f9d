"""The drift controls against float64 position-by-position implementations of their formulas (docs/method.md,
"Drift controls"), their losses and gradients, and the config errors that name what is wrong."""

import math

import pytest
import torch

from test_losses import random_case, reference_sampled_token
from megatron_bpd.drift_controls import (DriftControlConfig, control_metrics, drift_penalty, drift_weights,
                                         m2po_cutoff, seq_mask_weights, squared_log_ratios)
from megatron_bpd.losses import sampled_token_opd_loss


def case(seed=0, n=40, spread=0.4):
    cur, old, teacher, mask, gates = random_case(seed, n)
    behavior = old + spread * torch.randn(n, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return cur, old, teacher, mask, gates, behavior


def reference_weight(config, cur, old, behavior, valid, batch_cutoff=None):
    """w_t of one valid position from the formulas (the sequence mean and the M2PO cutoff are passed in)."""
    if not valid:
        return 0.0
    rho = math.exp(old - behavior)
    if config.kind == "token_drop":
        diff = math.exp(cur) - math.exp(behavior)
        above = math.inf if config.drop_above is None else config.drop_above
        return float(-config.drop_below <= diff <= above)
    if config.kind == "icepop":
        return rho if config.ratio_bounds[0] <= rho <= config.ratio_bounds[1] else 0.0
    if config.kind == "tis":
        return min(rho, config.cap)
    if config.kind == "m2po":
        return float((old - behavior) ** 2 < batch_cutoff)
    raise AssertionError(config.kind)


CONTROLS = [DriftControlConfig("token_drop"), DriftControlConfig("token_drop", drop_above=0.05, penalty=0.1),
            DriftControlConfig("icepop", ratio_bounds=(0.8, 1.3)), DriftControlConfig("tis", cap=1.2),
            DriftControlConfig("m2po", m2_threshold=0.05)]


def greedy_m2po_cutoff(values, threshold):
    """M2PO as written: drop the largest squared log-ratio until the mean of the rest is <= threshold."""
    kept = sorted(values)
    removed = []
    while kept and sum(kept) / len(kept) > threshold:
        removed.append(kept.pop())
    return min(removed) if removed else math.inf


@pytest.mark.parametrize("config", CONTROLS, ids=lambda c: f"{c.kind}-{c.drop_above}")
def test_weights_metrics_loss_and_gradient_match_the_formulas(config):
    cur, old, teacher, mask, gates, behavior = case(3)
    behavior[~mask] = float("nan")  # the sampler's log-probs outside the response are never read
    values = [(o - b) ** 2 for o, b, m in zip(old.tolist(), behavior.tolist(), mask.tolist()) if m]
    cutoff = None
    if config.kind == "m2po":
        cutoff = m2po_cutoff(squared_log_ratios(old, behavior, mask), config.m2_threshold)
        assert cutoff.item() == greedy_m2po_cutoff(values, config.m2_threshold)
        assert 0 < sum(v >= cutoff.item() for v in values) < len(values)  # the mask binds at some positions
    weights = drift_weights(config, cur, old, behavior, mask, m2_cutoff=cutoff)
    expected = [reference_weight(config, c, o, b, m, cutoff) for c, o, b, m in
                zip(cur.tolist(), old.tolist(), behavior.tolist(), mask.tolist())]
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)
    valid = [w for w, m in zip(expected, mask.tolist()) if m]
    assert 0 < sum(w == 0 for w in valid) < len(valid) or config.kind == "tis"
    metrics = control_metrics(config, weights, cur, old, behavior, mask)
    assert metrics["drift_masked_frac"].item() == pytest.approx(sum(w == 0 for w in valid) / len(valid))
    assert metrics["drift_weight_mean"].item() == pytest.approx(sum(valid) / len(valid), rel=1e-6)
    assert metrics["drift_weight_max"].item() == pytest.approx(max(valid), rel=1e-6)
    if config.kind == "m2po":
        kept = [v for v, w in zip(values, valid) if w]
        assert metrics["drift_m2"].item() == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert metrics["drift_m2_kept"].item() == pytest.approx(sum(kept) / len(kept), rel=1e-6)
        assert metrics["drift_m2_kept"].item() <= config.m2_threshold

    penalty = config.penalty if config.kind == "token_drop" else 0.0

    def reference(c):
        total = reference_sampled_token(c, old.tolist(), teacher.tolist(), mask.tolist(),
                                        [g * w for g, w in zip(gates.tolist(), expected)])
        count = int(mask.sum())
        return total + sum(g * penalty * (x - b) ** 2 for g, x, b, m in
                           zip(gates.tolist(), c, behavior.tolist(), mask.tolist()) if m) / (count + 1e-8)

    cur = cur.clone().requires_grad_()
    loss, _ = sampled_token_opd_loss(cur, old, teacher, mask, gates * weights)
    if penalty:
        loss = loss + (gates * drift_penalty(cur, behavior, mask, penalty)).sum() / (mask.sum() + 1e-8)
    assert loss.item() == pytest.approx(reference(cur.tolist()), rel=1e-9, abs=1e-12)
    loss.backward()
    h = 1e-6  # central differences of the reference (token_drop's mask is held: it is detached)
    for t in range(len(cur)):
        up, down = cur.detach().clone(), cur.detach().clone()
        up[t] += h
        down[t] -= h
        fd = (reference(up.tolist()) - reference(down.tolist())) / (2 * h)
        assert cur.grad[t].item() == pytest.approx(fd, abs=1e-6), t


def test_bad_inputs_are_named():
    cur, old, _, mask, _, behavior = case(8)
    position = int(mask.nonzero()[0])
    bad = behavior.clone()
    bad[position] = float("nan")
    for config in CONTROLS:
        with pytest.raises(ValueError, match=rf"non-finite behavior_logprobs at valid position \[{position}\]"):
            drift_weights(config, cur, old, bad, mask, m2_cutoff=torch.tensor(1.0))
        with pytest.raises(ValueError, match="shapes differ"):
            drift_weights(config, cur, old, behavior[:-1], mask, m2_cutoff=torch.tensor(1.0))


def test_seq_mask_masks_whole_sequences_by_the_geometric_mean_and_reduces_over_split_rows():
    cur, old, teacher, mask, gates, behavior = case(5, n=48, spread=0.08)
    rows = [x.view(4, 12) for x in (old, behavior, mask)]
    bounds = (0.98, 1.02)
    weights = seq_mask_weights(*rows, bounds)
    for r in range(4):
        logs = [o - b for o, b, m in zip(rows[0][r].tolist(), rows[1][r].tolist(), rows[2][r].tolist()) if m]
        kept = bounds[0] <= math.exp(sum(logs) / len(logs)) <= bounds[1]
        expected = [math.exp(o - b) if m and kept else 0.0
                    for o, b, m in zip(rows[0][r].tolist(), rows[1][r].tolist(), rows[2][r].tolist())]
        assert weights[r].tolist() == pytest.approx(expected, rel=1e-12), r
    assert 0 < int((weights.sum(-1) == 0).sum()) < 4  # some sequences masked, some kept
    # each row split in two halves (as over two CP ranks), the sums combined by ``reduce``: the same weights
    halves = [[x[:, :6] for x in rows], [x[:, 6:] for x in rows]]
    recorded = []
    for half in halves:  # each half's per-row (sum of log rho, count)
        seq_mask_weights(*half, bounds, recorded.append)
    first, second = [seq_mask_weights(*halves[i], bounds, lambda sums, i=i: sums.add_(recorded[1 - i])) for i in (0, 1)]
    torch.testing.assert_close(torch.cat([first, second], -1), weights)


def test_m2po_cutoff_keeps_ties_together_and_everything_under_the_threshold():
    assert m2po_cutoff(torch.tensor([0.0, 0.01, 0.02]), 0.04).item() == math.inf
    ties = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.1], dtype=torch.float64)
    assert m2po_cutoff(ties, 0.03).item() == 0.1  # both 0.1 go, though keeping one (moment 0.025) would do
    assert m2po_cutoff(torch.zeros(0), 0.04).item() == math.inf
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 4
    cutoff = m2po_cutoff(values, 0.04)
    assert cutoff.item() == greedy_m2po_cutoff(values.tolist(), 0.04)
    assert values[values < cutoff].mean() <= 0.04


def test_advantage_from_current_recomputes_the_advantage_from_the_detached_student():
    cur, old, teacher, mask, gates, _ = case(7)
    cur = cur.clone().requires_grad_()
    loss, metrics = sampled_token_opd_loss(cur, old, teacher, mask, gates, advantage_from="current")

    def reference(c):  # A = clamp(teach - cur) held fixed: the old log-probs replaced by cur in A only
        total, count = 0.0, 0
        for t in range(len(c)):
            if mask[t]:
                a = min(max(teacher[t].item() - cur[t].item(), -5.0), 5.0)
                r = math.exp(c[t] - old[t].item())
                total += gates[t].item() * -min(r * a, min(max(r, 0.8), 1.2) * a)
                count += 1
        return total / (count + 1e-8)

    assert loss.item() == pytest.approx(reference(cur.tolist()), rel=1e-9)
    valid = mask.nonzero()[:, 0]
    expected_mean = sum(min(max(teacher[t].item() - cur[t].item(), -5), 5) for t in valid) / len(valid)
    assert metrics["advantage_mean"].item() == pytest.approx(expected_mean, rel=1e-9)
    loss.backward()
    for t in range(len(cur)):
        up, down = cur.detach().clone().tolist(), cur.detach().clone().tolist()
        up[t] += 1e-6
        down[t] -= 1e-6
        assert cur.grad[t].item() == pytest.approx((reference(up) - reference(down)) / 2e-6, abs=1e-6), t


@pytest.mark.parametrize("overrides, message", [
    (["loss.drift_control.kind=icepop", "loss.drift_control.ratio_bounds=[5, 0.5]"],
     r"ratio_bounds must be \[low, high\] with 0 <= low < high, got \[5, 0.5\]"),
    (["loss.drift_control.kind=seq_mask", "loss.drift_control.seq_bounds=[1.1, 1.1]"], "seq_bounds must be"),
    (["loss.drift_control.kind=token_drop", "loss.drift_control.drop_below=0"], "drop_below must be > 0"),
    (["loss.drift_control.kind=token_drop", "loss.drift_control.drop_above=-0.1"], "drop_above must be > 0"),
    (["loss.drift_control.kind=tis", "loss.drift_control.cap=0"], "cap must be > 0"),
    (["loss.drift_control.kind=m2po", "loss.drift_control.m2_threshold=-1"], "m2_threshold must be > 0"),
    (["loss.drift_control.kind=tis", "loss.drift_control.m2_threshold=0.1"],
     "m2_threshold is a parameter of kind 'm2po', not of 'tis'"),
    (["loss.drift_control.kind=clip"], "kind must be one of"),
    (["loss.behavior_weight_cap=2"],
     r"loss.behavior_weight_cap was replaced by loss.drift_control: \{kind: tis, cap: C\}"),
    (["loss.drift_control.kind=tis", "reuse.old_logprobs=rollout"], "needs reuse.old_logprobs 'recompute'"),
    (["loss.drift_control.kind=m2po", "rollout.policy=teacher", "loss.kind=topk_lsm"],
     "reads the student's rollout log-probs .* needs rollout.policy 'student'"),
    (["loss.drift_control.kind=icepop", "loss.kind=topk_lsm"], "use token_drop or m2po with it"),
    (["loss.drift_control.kind=token_drop", "loss.kind=sft", "loss.gate.granularity=none"],
     "the sft loss takes no drift control"),
    (["loss.advantage_from=current", "loss.kind=topk_lsm"], "advantage_from 'current' .* needs the sampled_token"),
    (["loss.advantage_from=new"], "advantage_from must be one of"),
])
def test_bad_settings_are_named_config_errors(overrides, message):
    from megatron_bpd.train.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_the_dry_run_catches_a_bad_control():
    from megatron_bpd.train.__main__ import main

    with pytest.raises(ValueError, match="ratio_bounds must be"):
        main(["--dry-run", "loss.drift_control.kind=icepop", "loss.drift_control.ratio_bounds=[2, 1]"])


def test_a_control_without_rollout_log_probs_is_an_error():
    from megatron_bpd.gating import GateConfig, plan_segments
    from megatron_bpd.train.batch import MicroBatch
    from megatron_bpd.train.loss import LossConfig, m2po_batch_cutoff, opd_loss
    from megatron_bpd.vocab_parallel import LMHead

    cur, old, teacher, mask, _, _ = case(1, n=8)
    plan = plan_segments((1, 8), GateConfig(granularity="none"))
    batch = MicroBatch(tokens=torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long),
                       loss_mask=mask.view(1, 8), old_logprobs=old.view(1, 8).float(), segment_ids=plan.segment_ids,
                       plan=plan, teacher_logprobs=teacher.view(1, 8).float())
    config = LossConfig(drift_control=DriftControlConfig("token_drop"), gate=GateConfig(granularity="none"))
    with pytest.raises(ValueError, match="'token_drop' needs the rollout's log-probs"):
        opd_loss(LMHead.of_logits(torch.randn(1, 8, 5)), batch, config, mask.sum())
    with pytest.raises(ValueError, match="'m2po' needs the rollout's log-probs"):
        m2po_batch_cutoff([batch], DriftControlConfig("m2po"))
