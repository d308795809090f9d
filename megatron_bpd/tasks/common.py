"""What the synthetic tasks share: the answer format and its exact checker, drawing a dataset at a range of
difficulties without repeating a problem, and the trainer's prompt-file format.

A problem of any task has ``prompt_text``, ``solution_text``, ``answer``, ``difficulty`` (its horizon knob: digit
columns, list items), ``key`` (its identity for split disjointness: swapped or reordered operands are one problem)
and ``max_new_tokens`` (enough for a correct solution).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

Difficulties = Union[int, Tuple[int, int], Sequence[int]]

_ANSWER = re.compile(r"answer:\s*(-?\d+)")
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def extract_answer(response_text: str) -> Optional[str]:
    """The N of the last ``answer: N`` line if the response ends there (optionally followed by a ``\\boxed{N}``
    line with the same N and whitespace); otherwise None."""
    lines = response_text.rstrip().split("\n")
    if lines and lines[-1].strip().startswith("\\boxed"):
        boxed = _BOXED.fullmatch(lines[-1].strip())
        if boxed is None or len(lines) < 2:
            return None
        lines = lines[:-1]
        m = _ANSWER.fullmatch(lines[-1].strip())
        return m.group(1) if m and m.group(1) == boxed.group(1) else None
    m = _ANSWER.fullmatch(lines[-1].strip()) if lines else None
    return m.group(1) if m else None


def check(response_text: str, answer: Union[str, int]) -> bool:
    """Exact check: the response ends with ``answer: N`` (and optionally ``\\boxed{N}``) and ``N == answer``.
    A trailing ``<|im_end|>`` / ``<|endoftext|>`` is ignored."""
    text = response_text
    for special in ("<|im_end|>", "<|endoftext|>"):
        text = text.replace(special, "")
    got = extract_answer(text)
    return got is not None and got.lstrip("0") == str(answer).strip().lstrip("0")


def difficulty_choices(difficulties: Difficulties) -> List[int]:
    """An int, an inclusive ``(lo, hi)`` range or a list of allowed difficulties -> the list to draw from."""
    if isinstance(difficulties, int):
        choices = [difficulties]
    elif isinstance(difficulties, tuple) and len(difficulties) == 2:
        choices = list(range(difficulties[0], difficulties[1] + 1))
    else:
        choices = list(difficulties)
    if not choices:
        raise ValueError(f"difficulties={difficulties!r}: empty range")
    return choices


def draw_dataset(draw: Callable[[random.Random, int], Any], n: int, seed: int, difficulties: Difficulties,
                 exclude: Iterable[Hashable] = (), key: Callable[[Any], Hashable] = lambda p: p.key) -> list:
    """``n`` distinct problems ``draw(rng, difficulty)`` with ``random.Random(seed)``, each at a difficulty drawn
    uniformly from ``difficulties``. A problem whose ``key`` is in ``exclude`` (the keys of a training set) or
    already drawn is redrawn, so a held-out set never repeats a training problem."""
    choices = difficulty_choices(difficulties)
    seen = set(exclude)
    rng = random.Random(seed)
    out: list = []
    attempts = 0
    while len(out) < n:
        p = draw(rng, rng.choice(choices))
        attempts += 1
        if key(p) in seen:
            if attempts > 100 * n + 1000:
                raise ValueError("could not draw enough problems outside `exclude`: widen the difficulty range")
            continue
        seen.add(key(p))
        out.append(p)
    return out


def write_prompts_jsonl(path: Union[str, Path], problems: Iterable[Any]) -> Path:
    """One JSON object per line, the trainer's prompt-file format: ``{"prompt", "answer", "difficulty"}`` plus the
    problem's own ``fields()`` where it has them (the addition task's ``digits``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            extra = p.fields() if hasattr(p, "fields") else {}
            f.write(json.dumps({"prompt": p.prompt_text, "answer": p.answer, **extra,
                                "difficulty": p.difficulty}) + "\n")
    return path


def read_prompts_jsonl(path: Union[str, Path], parse_prompt: Callable[[str], Any]) -> list:
    """Problems back from a prompt file: each prompt parsed by its task's ``parse_prompt``; an answer that
    disagrees with the parsed problem is an error naming the line."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            row = json.loads(line)
            problem = parse_prompt(row["prompt"])
            if "answer" in row and str(row["answer"]) != problem.answer:
                raise ValueError(f"{path}:{number}: answer {row['answer']!r} but the prompt's is {problem.answer!r}")
            out.append(problem)
    return out
