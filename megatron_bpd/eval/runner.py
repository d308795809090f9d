r"""Sampling through the SGLang client, scoring with math-verify and pass@k aggregation.

``evaluate_async(client, tokenizer, benchmarks, config)`` samples ``config.n_samples`` responses per problem (one
``generate_rollout`` per problem, all problems in flight at once up to the client's concurrency), scores each
response with ``answers.check`` and returns an ``EvalResult`` (a JSON-ready dict plus helpers). Sample j of problem
i (file order) of a benchmark uses sampling seed ``seed + (benchmark_offset + i) * n_samples + j`` with a fixed
offset per benchmark (``benchmark_seed_offset``), so a problem gets the same seeds whatever the completion order,
the benchmark subset or ``--limit``.

Prompt: ``config.prompt_template`` with ``{problem}`` replaced by the problem text (a plain substitution: LaTeX braces
need no escaping), as the user message of the tokenizer's chat template with the generation prompt appended
(optionally after a system message); ``use_chat_template=False`` feeds the filled template as raw text.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from megatron_bpd.eval.answers import STATUSES, Verdict, _check_part, check
from megatron_bpd.eval.benchmarks import Problem
from megatron_bpd.eval.passk import mean_pass_at_k, pass_at_k_array

def benchmark_seed_offset(name: str) -> int:
    """Problem-index offset of a benchmark in the seed space: 10000 x its position in BENCHMARKS (other names: a
    CRC32-derived slot after those)."""
    import zlib

    from megatron_bpd.eval.benchmarks import BENCHMARKS

    slot = BENCHMARKS.index(name) if name in BENCHMARKS else len(BENCHMARKS) + zlib.crc32(name.encode()) % 1000
    return 10000 * slot


DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
_REPORTED = ("gold_parse_error", "pred_parse_error", "timeout", "error")


@dataclass
class EvalConfig:
    """The sampling and scoring settings of a run (the paper: n = 8, k = 8, T = 1.0, top-p 0.9, 16k tokens)."""

    n_samples: int = 8
    ks: Sequence[int] = (1, 8)
    max_new_tokens: int = 16384
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int | None = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    use_chat_template: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": False} for Qwen3 templates
    context_length: int | None = None  # when set, max_new_tokens is capped at context_length - prompt tokens
    check_timeout_s: int | None = 5
    check_workers: int = 0  # > 0: score in that many spawned processes, off the event loop
    keep_responses: bool = False  # store the decoded responses in the result

    def __post_init__(self):
        self.ks = sorted({int(k) for k in self.ks})
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"k values must be >= 1, got {self.ks}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.ks[-1] > self.n_samples:
            raise ValueError(f"pass@{self.ks[-1]} needs at least {self.ks[-1]} samples per problem, but n_samples = "
                             f"{self.n_samples}: raise -n or drop k = {self.ks[-1]}")
        if "{problem}" not in self.prompt_template:
            raise ValueError("the prompt template must contain the placeholder {problem}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def render_prompt(problem: str, config: EvalConfig, tokenizer=None) -> str:
    """The prompt text of one problem (chat template applied when ``config.use_chat_template``)."""
    user = config.prompt_template.replace("{problem}", problem)
    if not config.use_chat_template:
        return user
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: pass --no-chat-template to use the raw prompt")
    messages = ([{"role": "system", "content": config.system_prompt}] if config.system_prompt else []) + \
        [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(config.chat_template_kwargs or {}))


def build_prompt_ids(tokenizer, problems: Sequence[Problem], config: EvalConfig) -> list[list[int]]:
    """Token ids of every problem's prompt (no special tokens added beyond what the chat template writes)."""
    out = []
    for p in problems:
        text = render_prompt(p.problem, config, tokenizer)
        ids = tokenizer(text, add_special_tokens=not config.use_chat_template)["input_ids"]
        out.append(list(ids))
    return out


@dataclass
class ProblemResult:
    id: str
    answer: str
    n: int
    correct: int
    pass_at_k: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


def score_problem(problem: Problem, responses: Sequence[str], finish_reasons: Sequence[str],
                  num_tokens: Sequence[int], config: EvalConfig, verdicts: Sequence[Verdict] | None = None
                  ) -> ProblemResult:
    """Per-sample verdicts (computed here unless given), the correct count and the problem's pass@k."""
    if verdicts is None:
        verdicts = [check(text, problem.answer, config.check_timeout_s) for text in responses]
    samples = []
    for text, reason, length, v in zip(responses, finish_reasons, num_tokens, verdicts):
        sample = {"correct": v.correct, "status": v.status, "extracted": v.extracted, "finish_reason": reason,
                  "num_tokens": length}
        if v.detail:
            sample["detail"] = v.detail
        if config.keep_responses:
            sample["response"] = text
        samples.append(sample)
    c = sum(s["correct"] for s in samples)
    pk = {f"pass@{k}": float(pass_at_k_array([len(samples)], [c], k)[0]) for k in config.ks}
    return ProblemResult(problem.id, problem.answer, len(samples), c, pk, samples)


def aggregate(name: str, results: Sequence[ProblemResult], ks: Sequence[int]) -> dict[str, Any]:
    """A benchmark's summary: mean pass@k over its problems, status counts and the reported failures."""
    means = mean_pass_at_k([r.n for r in results], [r.correct for r in results], ks)
    statuses = {s: 0 for s in STATUSES}
    failures = []
    finish = {}
    for r in results:
        for j, s in enumerate(r.samples):
            statuses[s["status"]] = statuses.get(s["status"], 0) + 1
            finish[s["finish_reason"]] = finish.get(s["finish_reason"], 0) + 1
            if s["status"] in _REPORTED:
                failures.append({"id": r.id, "sample": j, "status": s["status"], "extracted": s["extracted"],
                                 "detail": s.get("detail", "")})
    tokens = [s["num_tokens"] for r in results for s in r.samples]
    return {
        "benchmark": name,
        "num_problems": len(results),
        "pass_at_k": {f"pass@{k}": means[k] for k in ks},
        "mean_correct_fraction": (sum(r.correct for r in results) / max(1, sum(r.n for r in results))),
        "status_counts": {k: v for k, v in statuses.items() if v},
        "finish_reasons": finish,
        "mean_response_tokens": (sum(tokens) / len(tokens)) if tokens else 0.0,
        "parse_failures": failures,
        "problems": [asdict(r) for r in results],
    }


async def _problem_task(client, rollout_config, prompt_ids, tokenizer):
    from megatron_bpd.rollout import generate_rollout

    batch = await generate_rollout(client, [prompt_ids], rollout_config)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in batch.response_ids]
    return texts, list(batch.finish_reason), [len(r) for r in batch.response_ids]


async def evaluate_async(client, tokenizer, benchmarks: Mapping[str, Sequence[Problem]], config: EvalConfig,
                         progress: bool = True) -> "EvalResult":
    """Sample, score and aggregate every problem of ``benchmarks`` (``{name: problems}``) through ``client``."""
    from tqdm.auto import tqdm

    from megatron_bpd.rollout import RolloutConfig, SamplingParams

    started = time.time()
    flat = [(name, i, p) for name, probs in benchmarks.items() for i, p in enumerate(probs)]
    jobs = []
    for pos, (name, i, p) in enumerate(flat):
        prompt = build_prompt_ids(tokenizer, [p], config)[0]
        max_new = config.max_new_tokens
        if config.context_length is not None:
            max_new = min(max_new, config.context_length - len(prompt))
            if max_new < 1:
                raise ValueError(f"{p.id}: the prompt has {len(prompt)} tokens, no room left in the context length "
                                 f"{config.context_length}")
        sampling = SamplingParams(max_new_tokens=max_new, temperature=config.temperature, top_p=config.top_p)
        seed = None if config.seed is None else config.seed + (benchmark_seed_offset(name) + i) * config.n_samples
        jobs.append((pos, RolloutConfig(n_samples=config.n_samples, sampling=sampling, seed=seed), prompt))
    per_problem: dict[int, ProblemResult] = {}
    pool = None
    if config.check_workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(config.check_workers, mp_context=multiprocessing.get_context("spawn"))

    async def sample_and_score(pos: int, rollout_config, prompt) -> tuple[int, ProblemResult]:
        texts, reasons, lengths = await _problem_task(client, rollout_config, prompt, tokenizer)
        problem = flat[pos][2]
        verdicts = None
        if pool is not None:
            part = (texts, [problem.answer] * len(texts), config.check_timeout_s)
            try:
                verdicts = await asyncio.get_running_loop().run_in_executor(pool, _check_part, part)
            except Exception as exc:  # noqa: BLE001 -- a crashed checker process: incorrect, reported
                verdicts = [Verdict(False, "error", None, f"checker process: {type(exc).__name__}: {str(exc)[:200]}")
                            for _ in texts]
        return pos, score_problem(problem, texts, reasons, lengths, config, verdicts)

    tasks = [asyncio.ensure_future(sample_and_score(pos, rc, prompt)) for pos, rc, prompt in jobs]
    bar = tqdm(total=len(tasks), desc="eval problems", unit="problem", disable=not progress, dynamic_ncols=True)
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                pos, result = task.result()  # raises the first failure
                per_problem[pos] = result
                bar.update(1)
                if progress:
                    solved = sum(r.correct > 0 for r in per_problem.values())
                    bar.set_postfix_str(f"solved {solved}/{len(per_problem)}")
    finally:
        bar.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    summaries = {}
    for name, probs in benchmarks.items():
        results = [per_problem[pos] for pos, (b, _, _) in enumerate(flat) if b == name]
        summaries[name] = aggregate(name, results, config.ks)
    return EvalResult.build(summaries, config, time.time() - started)


def mean_over_benchmarks(summaries: Mapping[str, Mapping[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """Unweighted mean over benchmarks of each pass@k (the paper's "mean" column)."""
    if not summaries:
        return {f"pass@{k}": 0.0 for k in ks}
    return {f"pass@{k}": sum(s["pass_at_k"][f"pass@{k}"] for s in summaries.values()) / len(summaries) for k in ks}


@dataclass
class EvalResult:
    """``data``: the JSON document (config, benchmarks with per-problem results, mean)."""

    data: dict[str, Any]

    @classmethod
    def build(cls, summaries: Mapping[str, Mapping[str, Any]], config: EvalConfig, elapsed_s: float,
              meta: Mapping[str, Any] | None = None) -> "EvalResult":
        cfg = asdict(config)
        cfg["ks"] = list(config.ks)
        return cls({
            "config": cfg,
            "meta": dict(meta or {}),
            "elapsed_s": round(elapsed_s, 3),
            "benchmarks": dict(summaries),
            "mean": mean_over_benchmarks(summaries, config.ks),
        })

    @property
    def ks(self) -> list[int]:
        return list(self.data["config"]["ks"])

    def table(self) -> list[dict[str, Any]]:
        """Rows: one per benchmark, then "mean" (pass@k as fractions in [0, 1])."""
        rows = [{"benchmark": name, "problems": s["num_problems"], **s["pass_at_k"]}
                for name, s in self.data["benchmarks"].items()]
        rows.append({"benchmark": "mean", "problems": sum(s["num_problems"] for s in self.data["benchmarks"].values()),
                     **self.data["mean"]})
        return rows

    def to_markdown(self) -> str:
        cfg = self.data["config"]
        cols = [f"pass@{k}" for k in self.ks]
        lines = [
            "# Evaluation",
            "",
            f"n = {cfg['n_samples']} samples per problem, temperature {cfg['temperature']}, top-p {cfg['top_p']}, "
            f"max new tokens {cfg['max_new_tokens']}, seed {cfg['seed']}; unbiased pass@k in %; "
            "mean = unweighted mean over benchmarks.",
            "",
            "| benchmark | problems | " + " | ".join(cols) + " |",
            "|---|---:|" + "---:|" * len(cols),
        ]
        for row in self.table():
            name = f"**{row['benchmark']}**" if row["benchmark"] == "mean" else row["benchmark"]
            lines.append(f"| {name} | {row['problems']} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
        names = list(self.data["benchmarks"])
        lines += ["", "Paper layout (pass@k in %):", "", "| | " + " | ".join(names) + " | mean |",
                  "|---|" + "---:|" * (len(names) + 1)]
        for c in cols:
            values = [self.data["benchmarks"][n]["pass_at_k"][c] for n in names] + [self.data["mean"][c]]
            lines.append(f"| {c} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
        failures = {n: s["parse_failures"] for n, s in self.data["benchmarks"].items() if s["parse_failures"]}
        lines += ["", "## Answer checking", "", "| benchmark | " + " | ".join(STATUSES) + " |",
                  "|---|" + "---:|" * len(STATUSES)]
        for name, s in self.data["benchmarks"].items():
            lines.append(f"| {name} | " + " | ".join(str(s["status_counts"].get(k, 0)) for k in STATUSES) + " |")
        if failures:
            lines += ["", "Parse failures, time-outs and errors (counted as incorrect):", ""]
            for name, items in failures.items():
                for f in items[:20]:
                    lines.append(f"- {f['id']} sample {f['sample']}: {f['status']} {f['detail'][:160]}")
                if len(items) > 20:
                    lines.append(f"- ... {len(items) - 20} more in {name} (see the JSON)")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``results.json`` and ``results.md`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "results.json", out / "results.md"
        json_path.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


async def evaluate_urls_async(urls: Sequence[str], tokenizer, benchmarks: Mapping[str, Sequence[Problem]],
                              config: EvalConfig, progress: bool = True, max_concurrency: int = 64,
                              request_timeout_s: float = 3600.0, health_timeout_s: float = 600.0) -> EvalResult:
    """``evaluate_async`` with a fresh ``SGLangClient`` on ``urls`` (waits for /health first)."""
    from megatron_bpd.rollout import ClientConfig, SGLangClient

    client_config = ClientConfig(urls=list(urls), max_concurrency=max_concurrency, request_timeout_s=request_timeout_s,
                                 health_timeout_s=health_timeout_s)
    async with SGLangClient(client_config) as client:
        await client.wait_healthy()
        return await evaluate_async(client, tokenizer, benchmarks, config, progress)


def evaluate(urls: Sequence[str], tokenizer, benchmarks: Mapping[str, Sequence[Problem]], config: EvalConfig,
             **kwargs) -> EvalResult:
    """Synchronous ``evaluate_urls_async`` (runs its own event loop)."""
    return asyncio.run(evaluate_urls_async(urls, tokenizer, benchmarks, replace(config), **kwargs))
