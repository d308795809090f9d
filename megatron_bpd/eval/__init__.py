"""Evaluation: unbiased pass@k on the shipped math benchmarks (AIME24, AIME25, AMC23, MATH500), answers checked
with math-verify. ``python -m megatron_bpd.eval --help``; the checker ``is_correct`` is also the trainer's."""

from megatron_bpd.eval.answers import Verdict, check, check_batch, is_correct, is_correct_batch, last_boxed, solve_rate
from megatron_bpd.eval.benchmarks import BENCHMARKS, Problem, available_benchmarks, load_benchmark, load_benchmarks
from megatron_bpd.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_array

__all__ = ["BENCHMARKS", "Problem", "Verdict", "available_benchmarks", "check", "check_batch", "is_correct",
           "is_correct_batch", "last_boxed", "load_benchmark", "load_benchmarks", "mean_pass_at_k", "pass_at_k",
           "pass_at_k_array", "solve_rate"]
