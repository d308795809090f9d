"""megatron_bpd.eval: the math-verify answer checker on the shipped benchmarks, unbiased pass@k, the runner's
aggregation, and an end-to-end smoke run of ``python -m megatron_bpd.eval`` on a tiny random model."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import urllib.request
from fractions import Fraction

import numpy as np
import pytest

from megatron_bpd.eval import answers
from megatron_bpd.eval.answers import KNOWN_SOLUTION_MISMATCHES, check, is_correct, is_correct_batch, last_boxed
from megatron_bpd.eval.benchmarks import BENCHMARKS, load_benchmark, load_benchmarks
from megatron_bpd.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_array

EXPECTED_SIZES = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500}


@pytest.fixture(scope="module")
def all_problems():
    return load_benchmarks()


# ---------------------------------------------------------------- benchmarks


def test_shipped_benchmarks_load_and_normalize(all_problems):
    assert list(all_problems) == list(BENCHMARKS)
    assert {k: len(v) for k, v in all_problems.items()} == EXPECTED_SIZES
    for name, probs in all_problems.items():
        ids = [p.id for p in probs]
        assert len(set(ids)) == len(ids) and all(i.startswith(name + "/") for i in ids)
        assert all(isinstance(p.problem, str) and p.problem.strip() for p in probs)
        assert all(isinstance(p.answer, str) and p.answer for p in probs)
    amc = all_problems["amc23"]
    assert amc[0].answer == "27" and amc[0].id == "amc23/0" and "url" in amc[0].meta
    assert all(not p.answer.endswith(".0") for p in amc)
    assert [p.answer for p in amc if p.answer.startswith("-")] == ["-1"]
    assert all(p.solution for p in all_problems["math500"] + all_problems["aime24"])
    assert all_problems["math500"][0].id.startswith("math500/test/") and all_problems["aime25"][3].id == "aime25/3"
    assert [p.id for p in load_benchmark("aime25", limit=2)] == ["aime25/0", "aime25/1"]
    with pytest.raises(ValueError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k")


def test_shipped_data_has_attribution():
    from megatron_bpd.eval.benchmarks import DATA_DIR

    sources = (DATA_DIR / "SOURCES.md").read_text()
    notice = (DATA_DIR / "NOTICE").read_text()
    for name in BENCHMARKS:
        assert f"{name}.jsonl" in sources and f"{name}.jsonl" in notice
    assert "MIT License" in notice and "Zhibin Gou" in notice and "Mathematical Association of America" in notice
    assert "Art of Problem Solving" in notice


# ---------------------------------------------------------------- answer checker


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{1} first, then \boxed{\frac{a}{b}} last", r"\frac{a}{b}"),
    (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),
    (r"$\boxed{\{1,2\}}$", r"\{1,2\}"),
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 42 and so on", "42"),
    (r"$\boxed 9$", "9"),
    (r"\boxed{3} then a truncated \boxed{\frac{1}{", "3"),
    ("no box at all", None),
    ("", None),
    (r"\boxed{}", ""),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_checker_cases():
    assert is_correct(r"... \boxed{25}", "025")  # AIME zero padding
    assert is_correct(r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}")
    assert is_correct(r"\boxed{0.5}", r"\frac{1}{2}")
    assert is_correct(r"\boxed{104.}", "104") and is_correct(r"\boxed{\textbf{(073)}}", "073")
    assert is_correct(r"\boxed{x = 5}", "5") and is_correct(r"\boxed{3,5,7}", "3, 5, 7")
    assert is_correct(r"\boxed{Evelyn}", r"\text{Evelyn}")
    assert is_correct(r"\boxed{27}", 27.0) and not is_correct(r"\boxed{28}", 27.0)
    assert not is_correct(r"\boxed{\frac{14}{5}}", r"\frac{14}{3}")
    assert not is_correct("The answer is 27.", "27")  # only boxed answers count
    assert check("The answer is 27.", "27").status == "no_boxed"
    assert check(r"\boxed{}", "27").status == "pred_parse_error"
    v = check(r"\boxed{26}", "27")
    assert (v.correct, v.status, v.extracted) == (False, "wrong", "26")
    assert is_correct_batch([r"\boxed{1}", r"\boxed{2}", "x"], "2") == [False, True, False]
    assert is_correct_batch([r"\boxed{1}", r"\boxed{2}"], ["1", "3"]) == [True, False]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        is_correct_batch(["a", "b"], ["1"])


def test_checker_survives_timeouts_and_errors(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    weird_answers = (r"\boxed{\frac{1}{0}}", r"\boxed{{{{{}", r"\boxed{\sqrt{}}", "\\boxed{\x00\u2603}",
                     r"\boxed{a=b=c<d}")
    for weird in weird_answers:
        assert check(weird, "3").correct is False  # scored, never raised

    def timeout_verify(*a, **k):
        raise TimeoutException("slow")

    def broken_verify(*a, **k):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "verify", timeout_verify)
    v = check(r"\boxed{3}", "3")
    assert (v.correct, v.status) == (False, "timeout")
    monkeypatch.setattr(math_verify, "verify", broken_verify)
    v = check(r"\boxed{3}", "3")
    assert (v.correct, v.status) == (False, "error") and "sympy exploded" in v.detail

    def broken_parse(*a, **k):
        raise TimeoutException("slow parse")

    monkeypatch.undo()
    monkeypatch.setattr(math_verify, "parse", broken_parse)
    answers._parse_gold_cached.cache_clear()
    try:
        v = check(r"\boxed{3}", "3")
        assert (v.correct, v.status) == (False, "timeout")
    finally:
        monkeypatch.undo()
        answers._parse_gold_cached.cache_clear()


def test_checker_works_off_the_main_thread():
    out = []

    def work():
        out.append((is_correct(r"\boxed{\frac{2}{4}}", r"\frac12"), is_correct(r"\boxed{3}", "4")))
        # worker processes: math-verify's time limits apply again
        out.append([v.status for v in answers.check_batch([r"\boxed{1}", r"\boxed{2}", "x"], "1", workers=1)])

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert out == [(True, False), ["correct", "wrong", "no_boxed"]]


def test_gold_answers_verify_against_themselves(all_problems):
    failures = []
    for probs in all_problems.values():
        for p in probs:
            v = check(f"Reasoning ... so the final answer is \\boxed{{{p.answer}}}.", p.answer)
            if not v.correct:
                failures.append((p.id, p.answer, v.status, v.detail))
    print(f"\ngold answers the checker cannot verify: {len(failures)}")
    for f in failures:
        print("  ", f)
    assert len(failures) <= 3, failures


def test_reference_solutions_verify(all_problems):
    failures = []
    for name in ("math500", "aime24"):
        for p in all_problems[name]:
            v = check(p.solution, p.answer)
            if not v.correct:
                failures.append((p.id, p.answer, v.status, v.extracted))
    print(f"\nreference solutions whose last box does not verify: {len(failures)}")
    for f in failures:
        print("  ", f, KNOWN_SOLUTION_MISMATCHES.get(f[0], "(not in KNOWN_SOLUTION_MISMATCHES)"))
    assert len(failures) <= 5, failures
    assert {f[0] for f in failures} >= set(KNOWN_SOLUTION_MISMATCHES)  # the documented ones really fail


def test_wrong_answers_are_incorrect(all_problems):
    numeric = [p for probs in all_problems.values() for p in probs if p.answer.lstrip("-").isdigit()]
    assert len(numeric) > 300
    accepted = [p.id for p in numeric if is_correct(f"\\boxed{{{int(p.answer) + 1}}}", p.answer)]
    assert accepted == []
    math500 = all_problems["math500"]
    swapped = [(a.id, b.answer) for a, b in zip(math500[:60], math500[1:61])
               if a.answer.replace(" ", "") != b.answer.replace(" ", "")
               and is_correct(f"\\boxed{{{b.answer}}}", a.answer)]
    assert len(swapped) <= 1, swapped  # another problem's answer is (almost) never accepted


# ---------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_matches_exact_fractions_random_and_edges():
    rng = random.Random(0)
    cases = [(rng.randint(1, 300), None, None) for _ in range(300)]
    cases = [(n, rng.randint(0, n), rng.randint(1, n)) for n, _, _ in cases]
    cases += [(8, 0, 8), (8, 8, 1), (8, 8, 8), (8, 1, 8), (8, 3, 6), (1, 0, 1), (1, 1, 1), (1000, 1, 1),
              (1000, 0, 500), (1000, 999, 1000), (500, 2, 3)]
    n, c, k = (np.array(x) for x in zip(*cases))
    for kk in sorted(set(k.tolist()))[:40]:
        sel = n >= kk
        got = pass_at_k_array(n[sel], c[sel], kk)
        want = [float(exact_pass_at_k(a, b, kk)) for a, b in zip(n[sel].tolist(), c[sel].tolist())]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    for a, b, kk in cases:
        assert pass_at_k(a, b, kk) == pytest.approx(float(exact_pass_at_k(a, b, kk)), rel=1e-10, abs=1e-12)
        if b == 0:
            assert pass_at_k(a, b, kk) == 0.0
        if a - b < kk:
            assert pass_at_k(a, b, kk) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)  # pass@1 is the mean correct fraction


def test_pass_at_k_vectorized_and_mean():
    n = [8, 8, 8, 4]
    c = [0, 3, 8, 1]
    got = pass_at_k_array(n, c, 2)
    np.testing.assert_allclose(got, [pass_at_k(a, b, 2) for a, b in zip(n, c)])
    np.testing.assert_allclose(pass_at_k_array(8, [0, 3, 8], 2), got[:3])
    means = mean_pass_at_k(n, c, [1, 2])
    assert means[1] == pytest.approx(np.mean([0, 3 / 8, 1, 1 / 4]))
    assert mean_pass_at_k([], [], [1]) == {1: 0.0}


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match=r"pass@9 needs at least k = 9 samples"):
        pass_at_k(8, 3, 9)
    with pytest.raises(ValueError, match="pass@5 needs"):
        pass_at_k_array([8, 4], [1, 1], 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k(4, 1, 0)
    from megatron_bpd.eval.runner import EvalConfig

    with pytest.raises(ValueError, match="pass@8 needs at least 8 samples"):
        EvalConfig(n_samples=4, ks=(1, 8))


# ---------------------------------------------------------------- runner (scripted responses)


@pytest.mark.parametrize("check_workers", [0, 1])
def test_runner_aggregates_scripted_responses(monkeypatch, tmp_path, check_workers):
    """The runner's bookkeeping with a fake sampler: prompts, seeds, per-problem counts, pass@k, mean, files."""
    from megatron_bpd.eval import runner
    from megatron_bpd.eval.runner import EvalConfig, evaluate_async

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kwargs):
            assert not tokenize and add_generation_prompt and kwargs == {"enable_thinking": False}
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(ch) for ch in text]}

    benches = {"aime25": load_benchmark("aime25", limit=3), "amc23": load_benchmark("amc23", limit=2)}
    answer_of = {p.id: p.answer for probs in benches.values() for p in probs}
    problem_of = {p.id: p.problem for probs in benches.values() for p in probs}
    plan = {"aime25/0": 4, "aime25/1": 1, "aime25/2": 0, "amc23/0": 2, "amc23/1": 0}  # correct samples of 4
    seen = {}

    async def fake_task(client, rollout_config, prompt_ids, tokenizer):
        text = "".join(chr(t) for t in prompt_ids)
        (pid,) = [i for i in answer_of if text == f"<user>{problem_of[i]}\nPlease reason step by step, and put your "
                  "final answer within \\boxed{}.<assistant>"]
        seen[pid] = (rollout_config.seed, rollout_config.n_samples, rollout_config.sampling.top_p)
        good = plan[pid]
        texts = [f"... \\boxed{{{answer_of[pid]}}}" if j < good else "... \\boxed{-12345}" for j in range(4)]
        return texts, ["stop"] * 4, [10] * 4

    monkeypatch.setattr(runner, "_problem_task", fake_task)
    config = EvalConfig(n_samples=4, ks=[1, 2, 4], seed=100, check_workers=check_workers,
                        chat_template_kwargs={"enable_thinking": False})
    result = asyncio.run(evaluate_async(None, Tok(), benches, config, progress=False))
    # seeds: seed + (10000 * position of the benchmark in BENCHMARKS + problem index) * n
    assert seen == {"aime25/0": (100 + 4 * 20000, 4, 0.9), "aime25/1": (100 + 4 * 20001, 4, 0.9),
                    "aime25/2": (100 + 4 * 20002, 4, 0.9), "amc23/0": (100 + 4 * 30000, 4, 0.9),
                    "amc23/1": (100 + 4 * 30001, 4, 0.9)}
    data = result.data
    counts = {p["id"]: p["correct"] for b in data["benchmarks"].values() for p in b["problems"]}
    assert counts == plan
    for name, b in data["benchmarks"].items():
        for k in (1, 2, 4):
            expect = np.mean([pass_at_k(4, p["correct"], k) for p in b["problems"]])
            assert b["pass_at_k"][f"pass@{k}"] == pytest.approx(expect)
    assert data["benchmarks"]["aime25"]["pass_at_k"]["pass@1"] == pytest.approx(5 / 12)
    assert data["benchmarks"]["amc23"]["pass_at_k"]["pass@4"] == pytest.approx(0.5)
    assert data["mean"]["pass@4"] == pytest.approx((2 / 3 + 0.5) / 2)
    json_path, md_path = result.write(tmp_path)
    md = md_path.read_text()
    assert "| aime25 | 3 | 41.7 |" in md and "| **mean** | 5 |" in md
    assert json.loads(json_path.read_text())["mean"] == data["mean"]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cli_end_to_end_with_embedded_server(tmp_path, capsys):
    from megatron_bpd.eval.cli import main
    from megatron_bpd.models.tiny import make_tiny_qwen3

    model = make_tiny_qwen3(tmp_path / "tiny", layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, ffn=64,
                            vocab=300)
    out = tmp_path / "eval"
    rc = main(["--model", str(model), "--out", str(out), "--limit", "2", "-n", "2", "-k", "1", "2",
               "--max-new-tokens", "6", "--seed", "3", "--no-progress", "--server-args", "--threads 1",
               "--server-startup-timeout", "120"])
    assert rc == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert (out / "server.log").exists()
    (url,) = data["meta"]["urls"]  # the embedded server was stopped on the way out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    assert list(data["benchmarks"]) == list(BENCHMARKS)
    for name in BENCHMARKS:
        assert f"| {name} | 2 |" in md and f"| {name} | 2 |" in printed
    assert "| **mean** | 8 |" in md
    assert data["config"]["temperature"] == 1.0 and data["config"]["top_p"] == 0.9
    for name, b in data["benchmarks"].items():
        assert b["num_problems"] == 2 and len(b["problems"]) == 2
        for p in b["problems"]:
            assert p["n"] == 2 and len(p["samples"]) == 2 and 0 <= p["correct"] <= 2
            assert p["correct"] == sum(s["correct"] for s in p["samples"])
            assert all(s["num_tokens"] <= 6 and s["finish_reason"] in ("stop", "length", "abort") for s in p["samples"])
        for k in (1, 2):
            value = b["pass_at_k"][f"pass@{k}"]
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(np.mean([pass_at_k(2, p["correct"], k) for p in b["problems"]]))
    for k in (1, 2):
        assert data["mean"][f"pass@{k}"] == pytest.approx(
            np.mean([b["pass_at_k"][f"pass@{k}"] for b in data["benchmarks"].values()]))


def test_cli_argument_errors(tmp_path):
    from megatron_bpd.eval.cli import main

    with pytest.raises(SystemExit) as err:
        main(["--urls", "http://127.0.0.1:9", "--tokenizer", str(tmp_path), "--out", str(tmp_path), "-n", "4",
              "-k", "8"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        main(["--urls", "http://127.0.0.1:9", "--tokenizer", str(tmp_path), "--out", str(tmp_path),
              "--benchmarks", "gsm8k"])
    assert err.value.code == 2
