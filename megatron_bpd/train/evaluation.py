"""Held-out evaluation during training: what makes learning visible, as opposed to the per-step solve rate of a
few training prompts.

Every ``eval.every`` steps (and before the first update, and after the last) rank 0 asks the rollout servers,
which hold the current weights, for

- greedy responses to the held-out prompts (``eval.prompts``, first ``eval.limit``) -> greedy accuracy;
- ``eval.samples`` responses per prompt at the rollout temperature and top-p -> pass@1 (the mean correct fraction)
  and pass@n (n = ``eval.samples``, the unbiased estimator of ``eval.passk``);

both overall and grouped by the prompts' difficulty (``data.difficulty_key``), with a 95% interval over the
evaluated problems. The teacher is evaluated once, at step 0, the same way.

The support KL probe: ``eval.probe_prompts`` fixed held-out prompts, ``eval.probe_samples`` responses each sampled
by the current student with fixed seeds, scored by the teacher (top-K); every rank then computes the student's
reverse KL to the teacher on the teacher's top-K support (``losses.topk_lsm_loss``'s ``support_kl``) with the
Megatron model, so the number is the same under every parallel layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch.distributed as dist

from ..eval.passk import mean_pass_at_k
from ..rollout.client import SGLangClient, gather_all
from ..rollout.protocol import SamplingParams
from ..rollout.rollout import RolloutConfig, generate_rollout
from ..rollout.types import TrajectoryBatch
from .data import Prompt


def wilson_interval(correct: int, n: int, z: float = 1.96) -> List[float]:
    """95% Wilson score interval of a binomial proportion ``correct / n`` (``[0, 1]`` when n = 0)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mean_interval(values: Sequence[float], z: float = 1.96) -> List[float]:
    """Normal-approximation 95% interval of the mean of ``values`` (per-problem pass@1 fractions)."""
    n = len(values)
    if n < 2:
        return [0.0, 1.0]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [max(0.0, mean - z * sd / math.sqrt(n)), min(1.0, mean + z * sd / math.sqrt(n))]


def _responses_correct(trajectories: TrajectoryBatch, prompts: Sequence[Prompt], tokenizer, checker) -> List[bool]:
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in trajectories.response_ids]
    return [bool(checker(t, prompts[i].answer)) for t, i in zip(texts, trajectories.prompt_index)]


async def evaluate_policy(client: SGLangClient, prompts: Sequence[Prompt], tokenizer, checker: Callable,
                          max_new_tokens: int, samples: int, temperature: float, top_p: float, seed: int) -> dict:
    """Greedy accuracy, pass@1 and pass@``samples`` (``samples`` draws at ``temperature`` / ``top_p``) of the model
    behind ``client`` on ``prompts``: ``{"n", "greedy", "greedy_ci", "pass1", "pass1_ci", "pass<samples>",
    "by_difficulty": {d: {...}}}``."""
    ids = [p.token_ids for p in prompts]
    rollouts = [generate_rollout(client, ids, RolloutConfig(  # greedy and sampled requests all in flight at once
        n_samples=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens), seed=seed))]
    if samples:
        rollouts.append(generate_rollout(client, ids, RolloutConfig(
            n_samples=samples, sampling=SamplingParams(temperature=temperature, top_p=top_p,
                                                       max_new_tokens=max_new_tokens), seed=seed)))
    greedy, *sampled = await gather_all(rollouts)
    greedy_ok = _responses_correct(greedy, prompts, tokenizer, checker)
    per_problem = None
    if samples:
        ok = _responses_correct(sampled[0], prompts, tokenizer, checker)
        per_problem = [sum(ok[i * samples:(i + 1) * samples]) for i in range(len(prompts))]

    def summary(rows: List[int]) -> dict:
        correct = sum(greedy_ok[i] for i in rows)
        out = {"n": len(rows), "greedy": correct / max(1, len(rows)), "greedy_ci": wilson_interval(correct, len(rows))}
        if per_problem is not None:
            correct = [per_problem[i] for i in rows]
            out.update({f"pass{k}": v for k, v in mean_pass_at_k(samples, correct, sorted({1, samples})).items()})
            out["pass1_ci"] = mean_interval([c / samples for c in correct])
        return out

    result = summary(list(range(len(prompts))))
    groups: Dict[str, List[int]] = {}
    for i, p in enumerate(prompts):
        if p.difficulty is not None:
            groups.setdefault(str(p.difficulty), []).append(i)
    result["by_difficulty"] = {d: summary(rows) for d, rows in sorted(groups.items())}
    return result


def solve_rate_by_difficulty(correct: Sequence[bool], difficulties: Sequence[Optional[str]]) -> Dict[str, float]:
    """``{"solve_rate_<d>": fraction}`` for each difficulty present (trajectories without one are left out)."""
    groups: Dict[str, List[bool]] = {}
    for ok, d in zip(correct, difficulties):
        if d is not None:
            groups.setdefault(str(d), []).append(ok)
    return {f"solve_rate_{d}": sum(v) / len(v) for d, v in sorted(groups.items())}


def flat_eval_metrics(result: dict, prefix: str = "eval") -> Dict[str, float]:
    """The scalars of ``evaluate_policy``'s result as ``eval_greedy``, ``eval_pass1``, ``eval_greedy_<d>``, ..."""
    scalar = lambda group: [k for k in group if k == "greedy" or k.startswith("pass") and not k.endswith("_ci")]  # noqa: E731
    out = {f"{prefix}_{k}": result[k] for k in scalar(result)}
    for d, group in result.get("by_difficulty", {}).items():
        out.update({f"{prefix}_{k}_{d}": group[k] for k in scalar(group)})
    return out


class Evaluator:
    """``evaluator(feed, done, with_teacher)``: the held-out evaluation after ``done`` training steps, on every rank.
    Rank 0 has the servers (through the ``RolloutFeed`` ``feed``, at weight version ``done``) evaluate the student
    (and with ``with_teacher`` the teacher) on ``prompts`` and sample the probe with ``sampler``
    (``rollout_feed.Sampler``); every rank then computes the probe's support KL with ``passes``
    (``passes.ScoringPasses``). Rank 0 appends the result to ``out/evals.jsonl`` and returns the flat scalars
    (other ranks: {})."""

    def __init__(self, config, prompts: Sequence[Prompt], tokenizer, checker: Callable, sampler, passes, out: Path):
        self.config, self.prompts, self.tokenizer, self.checker = config, prompts, tokenizer, checker
        self.sampler, self.passes, self.path = sampler, passes, Path(out) / "evals.jsonl"

    def __call__(self, feed, done: int, with_teacher: bool = False) -> dict:
        main = dist.get_rank() == 0
        result, probe = None, [None]
        if main:  # on servers holding the trainer's current weights (version ``done``)
            result, probe[0] = feed.call(done, lambda client, teacher: self._evaluate(client, teacher, with_teacher))
        dist.broadcast_object_list(probe, src=0)
        support_kl = self.passes.probe_support_kl(*probe[0]) if probe[0] is not None else None
        if not main:
            return {}
        result["step"] = done
        if support_kl is not None:
            result["support_kl"] = support_kl
        with open(self.path, "a") as f:
            f.write(json.dumps(result) + "\n")
        flat = flat_eval_metrics(result["student"])
        if support_kl is not None:
            flat["probe_support_kl"] = support_kl
        return flat

    async def _evaluate(self, client, teacher_client, with_teacher: bool):
        """({"student": result, "teacher": result (with ``with_teacher``)}, the probe's (trajectories, teacher
        scores) or None)."""
        c, r = self.config, self.config.rollout
        run = lambda target: evaluate_policy(target, self.prompts, self.tokenizer, self.checker,  # noqa: E731
                                             r.max_new_tokens, c.eval.samples, r.temperature, r.top_p, c.eval.seed)
        probe_ids = [p.token_ids for p in self.prompts[:c.eval.probe_prompts]]

        async def nothing():
            return None
        # the student's and the teacher's evaluations and the probe run side by side: all their requests in flight
        student, teacher, probed = await gather_all([
            run(client), run(teacher_client) if with_teacher and teacher_client is not None else nothing(),
            self.sampler.sample(client, teacher_client, probe_ids, c.eval.probe_samples, c.eval.seed + 7919)
            if c.eval.probe_prompts and teacher_client is not None else nothing()])
        return {"student": student} | ({"teacher": teacher} if teacher is not None else {}), probed


def rollout_stats(prompts: Sequence[Prompt], trajectories: TrajectoryBatch, tokenizer, checker: Optional[Callable]
                  ) -> Dict[str, float]:
    """A training rollout's response length, truncated and aborted fractions and, with an answer ``checker``, its
    solve rate overall and by difficulty (``solve_rate_<d>``)."""
    lengths = [len(r) for r in trajectories.response_ids]
    stats = {"response_length": sum(lengths) / max(len(lengths), 1),
             "truncated_fraction": sum(f == "length" for f in trajectories.finish_reason) / len(lengths),
             "aborted_fraction": sum(f == "abort" for f in trajectories.finish_reason) / len(lengths)}
    if checker is not None:
        answers = [prompts[i].answer for i in trajectories.prompt_index]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in trajectories.response_ids]
        scored = [(checker(t, a), prompts[i].difficulty)
                  for t, a, i in zip(texts, answers, trajectories.prompt_index) if a is not None]
        stats["solve_rate"] = sum(ok for ok, _ in scored) / len(scored) if scored else float("nan")
        stats.update(solve_rate_by_difficulty(*zip(*scored)) if scored else {})
    return stats


def answer_checker(name: str) -> Optional[Callable]:
    """``check(response_text, answer) -> bool`` by name (``DataSettings.answer_checker``, validated there): "math"
    (math-verify on the last \\boxed{}), a synthetic task's name or "arithmetic" (their exact answer-line
    checker), or "none"."""
    if name == "none":
        return None
    if name == "math":
        from ..eval.answers import is_correct

        return is_correct
    from ..tasks.common import check

    return check
