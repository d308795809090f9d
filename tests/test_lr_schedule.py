"""The learning-rate schedule (Megatron's OptimizerParamScheduler behind ``train.setup.lr_scheduler``): linear
warmup from 0, then constant / linear / cosine decay to ``min_lr`` at the run's last update, resumable."""

import math
from types import SimpleNamespace

import pytest

from megatron_bpd.train.setup import OptimizerSettings, lr_scheduler


def lrs(settings, total, done=0, updates=None):
    optimizer = SimpleNamespace(param_groups=[{"lr": settings.lr, "max_lr": settings.lr, "min_lr": settings.min_lr,
                                               "weight_decay": 0.0}])
    scheduler = lr_scheduler(optimizer, settings, total, done)
    out = []
    for _ in range(total - done if updates is None else updates):
        out.append(optimizer.param_groups[0]["lr"])  # the lr of the next optimizer update
        scheduler.step(1)
    return out


def test_warmup_then_cosine_matches_the_closed_form():
    settings = OptimizerSettings(lr=1e-3, min_lr=1e-4, lr_warmup_steps=4, lr_decay_style="cosine")
    expected = [1e-3 * u / 4 for u in range(4)] + [
        1e-4 + 0.5 * (1 + math.cos(math.pi * (u - 4) / 6)) * 9e-4 for u in range(4, 10)]
    assert lrs(settings, 10) == pytest.approx(expected)


def test_constant_without_warmup_is_the_configured_lr_and_resume_continues_the_schedule():
    assert lrs(OptimizerSettings(lr=3e-4), 5) == pytest.approx([3e-4] * 5)
    settings = OptimizerSettings(lr=1e-3, lr_warmup_steps=6, lr_decay_style="linear")
    whole = lrs(settings, 12)
    assert lrs(settings, 12, done=5) == pytest.approx(whole[5:])


def test_bad_schedules_are_named():
    with pytest.raises(ValueError, match="lr_decay_style"):
        OptimizerSettings(lr_decay_style="step")
    with pytest.raises(ValueError, match="fewer than the run's 4 optimizer updates"):
        lrs(OptimizerSettings(lr=1e-3, lr_warmup_steps=4), 4)
