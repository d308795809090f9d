"""Column addition with a scratchpad: a synthetic long-horizon reasoning task with an exact checker.

A problem adds two numbers of ``digits`` digits each (leading digit non-zero). The solution works one digit column
per line, from the ones column up, carrying explicitly, then states the answer::

    prompt:   "Add 4821 + 3977 column by column."
    solution: "1+7+0=8 write 8 carry 0
               2+7+0=9 write 9 carry 0
               8+9+0=17 write 7 carry 1
               4+3+1=8 write 8 carry 0
               answer: 8798
               \\boxed{8798}"

The response has ``digits + 2`` lines (about 12 tokens per column line with a digit-per-token tokenizer), so its
length grows linearly with the difficulty and every line depends on the carry of the line before it.
``check`` is exact: the last ``answer: N`` line must be ``N == answer`` and nothing but an optional
``\\boxed{N}`` line (with the same N) may follow it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

PROMPT_TEMPLATE = "Add {a} + {b} column by column."
DIGIT_RANGE = (2, 8)


@dataclass(frozen=True)
class Problem:
    prompt_text: str
    solution_text: str
    answer: str
    digits: int
    a: int
    b: int


def solution_lines(a: int, b: int) -> List[str]:
    """The scratchpad of ``a + b``: one line per digit column of the longer operand, then the answer lines."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, lines = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s} write {s % 10} carry {s // 10}")
        carry = s // 10
    total = a + b
    lines.append(f"answer: {total}")
    lines.append(f"\\boxed{{{total}}}")
    return lines


def make_problem(rng: random.Random, digits: int) -> Problem:
    """Two uniformly drawn ``digits``-digit numbers (leading digit non-zero) and their worked sum."""
    if digits < 1:
        raise ValueError(f"digits={digits}: need at least 1")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return Problem(PROMPT_TEMPLATE.format(a=a, b=b), "\n".join(solution_lines(a, b)), str(a + b), digits, a, b)


def make_dataset(n: int, seed: int, digits: Union[int, Tuple[int, int], Sequence[int]] = DIGIT_RANGE,
                 exclude: Optional[Iterable[Problem]] = None) -> List[Problem]:
    """``n`` problems drawn with ``random.Random(seed)``; ``digits`` is an int, an inclusive ``(lo, hi)`` range
    (each problem draws its digit count uniformly) or a list of allowed counts. Problems whose ``(a, b)`` is in
    ``exclude`` (e.g. a training set) are redrawn, so a held-out set never repeats a training problem."""
    if isinstance(digits, int):
        choices = [digits]
    elif isinstance(digits, tuple) and len(digits) == 2:
        choices = list(range(digits[0], digits[1] + 1))
    else:
        choices = list(digits)
    if not choices:
        raise ValueError(f"digits={digits!r}: empty range")
    seen = {(p.a, p.b) for p in exclude} if exclude is not None else set()
    rng = random.Random(seed)
    out: List[Problem] = []
    attempts = 0
    while len(out) < n:
        p = make_problem(rng, rng.choice(choices))
        attempts += 1
        if (p.a, p.b) in seen:
            if attempts > 100 * n + 1000:
                raise ValueError("could not draw enough problems outside `exclude`: widen the digit range")
            continue
        seen.add((p.a, p.b))
        out.append(p)
    return out


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


def task_corpus(seed: int = 0, n: int = 3000, digits: Tuple[int, int] = (1, 10)) -> List[str]:
    """Prompt + solution texts covering the task vocabulary (for training a task tokenizer)."""
    return [p.prompt_text + "\n" + p.solution_text + "\n" for p in make_dataset(n, seed, digits)]


def write_prompts_jsonl(path: Union[str, Path], problems: Iterable[Problem]) -> Path:
    """One JSON object per line: ``{"prompt", "answer", "digits", "difficulty"}`` (the trainer's prompt-file format;
    the difficulty is the digit count)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt_text, "answer": p.answer, "digits": p.digits,
                                "difficulty": p.digits}) + "\n")
    return path


def read_problems_jsonl(path: Union[str, Path]) -> List[Problem]:
    """Problems back from a file written by ``write_prompts_jsonl`` (the operands are parsed from the prompt)."""
    out = []
    pattern = re.compile(r"Add (\d+) \+ (\d+) ")
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            m = pattern.match(row["prompt"])
            if m is None:
                raise ValueError(f"{path}: not an addition prompt: {row['prompt']!r}")
            a, b = int(m.group(1)), int(m.group(2))
            out.append(Problem(row["prompt"], "\n".join(solution_lines(a, b)), str(a + b),
                               int(row.get("digits", len(str(max(a, b))))), a, b))
    return out


def problem_dict(p: Problem) -> dict:
    return asdict(p)
