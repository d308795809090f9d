"""Held-out evaluation during training (train/evaluation.py): the interval formulas, grouping by difficulty, and
greedy accuracy through the embedded server against transformers' own greedy decoding of the same problems."""

import asyncio
import math
from pathlib import Path

import pytest

from megatron_bpd.train.evaluation import (evaluate_policy, flat_eval_metrics, mean_interval,
                                           solve_rate_by_difficulty, wilson_interval)

SHIPPED = Path(__file__).resolve().parents[1] / "megatron_bpd" / "data" / "task_models"


def test_wilson_interval_matches_the_closed_form():
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2 / 40000) / (1 + 1.96^2 / 100)
    low, high = wilson_interval(50, 100)
    half = 1.96 * math.sqrt(0.0025 + 1.96 ** 2 / 40000) / (1 + 1.96 ** 2 / 100)
    assert low == pytest.approx(0.5 - half, abs=1e-12) and high == pytest.approx(0.5 + half, abs=1e-12)
    assert low == pytest.approx(0.4038, abs=1e-4)
    low, high = wilson_interval(0, 20)  # never below 0, and not degenerate at p = 0
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == [0.0, 1.0]


def test_mean_interval_is_the_normal_interval_of_the_mean():
    values = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75]
    mean = sum(values) / 6
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 5)
    low, high = mean_interval(values)
    assert low == pytest.approx(mean - 1.96 * sd / math.sqrt(6)) and high == pytest.approx(min(1.0, mean + 1.96 * sd /
                                                                                                 math.sqrt(6)))


def test_solve_rates_are_grouped_by_difficulty():
    rates = solve_rate_by_difficulty([True, False, True, True, False], ["2", "2", "3", None, "4"])
    assert rates == {"solve_rate_2": 0.5, "solve_rate_3": 1.0, "solve_rate_4": 0.0}
    flat = flat_eval_metrics({"greedy": 0.5, "pass1": 0.25, "by_difficulty": {"2": {"greedy": 1.0, "pass1": 0.5}}})
    assert flat == {"eval_greedy": 0.5, "eval_pass1": 0.25, "eval_greedy_2": 1.0, "eval_pass1_2": 0.5}


def test_greedy_accuracy_through_the_server_equals_transformers_greedy(tmp_path):
    """The server's greedy decoding and the checker, per problem, against HF generate on the same prompts."""
    from transformers import AutoTokenizer

    from megatron_bpd.rollout.client import ClientConfig, SGLangClient
    from megatron_bpd.rollout.embedded import EmbeddedServer
    from megatron_bpd.tasks.arithmetic import make_dataset
    from megatron_bpd.tasks.common import check, write_prompts_jsonl
    from megatron_bpd.tasks.sft import generate
    from megatron_bpd.train.data import PromptDataset

    problems = make_dataset(24, seed=5, digits=(2, 4))
    path = write_prompts_jsonl(tmp_path / "held_out.jsonl", problems)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / "student")
    prompts = PromptDataset(str(path), tokenizer, "{problem}", True, 512, 0, shuffle=False).prompts
    expected = [check(r, p.answer) for r, p in zip(generate(SHIPPED / "student", problems), problems)]

    async def served():
        with EmbeddedServer(SHIPPED / "student") as server:
            async with SGLangClient(ClientConfig(urls=[server.url], max_concurrency=8)) as client:
                return await evaluate_policy(client, prompts, tokenizer, check, 96, 2, 1.0, 0.9, seed=3)

    result = asyncio.run(served())
    assert 0 < sum(expected) < len(expected), "pick problems the student solves only in part"
    assert result["n"] == 24 and result["greedy"] == pytest.approx(sum(expected) / 24)
    for d in ("2", "3", "4"):
        rows = [ok for ok, p in zip(expected, problems) if str(p.digits) == d]
        assert result["by_difficulty"][d]["greedy"] == pytest.approx(sum(rows) / len(rows))
        assert result["by_difficulty"][d]["n"] == len(rows)
    assert 0.0 <= result["pass1"] <= 1.0 and result["pass1_ci"][0] <= result["pass1"] <= result["pass1_ci"][1]
    assert result["greedy_ci"] == wilson_interval(sum(expected), 24)
