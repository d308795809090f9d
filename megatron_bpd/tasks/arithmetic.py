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

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from megatron_bpd.tasks.common import Difficulties, draw_dataset, read_prompts_jsonl

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

    @property
    def difficulty(self) -> int:
        """The horizon: the digit count (one solution line per digit column)."""
        return self.digits

    @property
    def key(self) -> Tuple[int, int]:
        """Identity for split disjointness: ``b + a`` is the same problem as ``a + b``."""
        return (min(self.a, self.b), max(self.a, self.b))

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for a correct solution (12 per column line + the answer lines)."""
        return 13 * self.digits + 2 * (self.digits + 2) + 16

    def fields(self) -> dict:
        """Extra prompt-file fields (``common.write_prompts_jsonl``)."""
        return {"digits": self.digits}


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


def make_dataset(n: int, seed: int, digits: Difficulties = DIGIT_RANGE,
                 exclude: Optional[Iterable[Problem]] = None) -> List[Problem]:
    """``n`` problems drawn with ``random.Random(seed)`` (``common.draw_dataset``); ``digits`` is an int, an
    inclusive ``(lo, hi)`` range or a list of allowed counts. Problems whose ordered ``(a, b)`` is in ``exclude``
    (e.g. a training set) are redrawn. This is the split of the shipped pair (``tasks.sft.datasets``), kept as it
    was drawn: ``b + a`` of a training problem may appear in it; ``tasks.registry.splits`` excludes those too."""
    ordered = lambda p: (p.a, p.b)  # noqa: E731
    return draw_dataset(make_problem, n, seed, digits, map(ordered, exclude or ()), key=ordered)


def task_corpus(seed: int = 0, n: int = 3000, digits: Tuple[int, int] = (1, 10)) -> List[str]:
    """Prompt + solution texts covering the task vocabulary (for training a task tokenizer)."""
    return [p.prompt_text + "\n" + p.solution_text + "\n" for p in make_dataset(n, seed, digits)]


_PROMPT = re.compile(r"Add (\d+) \+ (\d+) column by column\.")


def parse_prompt(prompt: str) -> Problem:
    """The problem back from its prompt text (the digit count is the longer operand's)."""
    m = _PROMPT.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    a, b = int(m.group(1)), int(m.group(2))
    return Problem(prompt.strip(), "\n".join(solution_lines(a, b)), str(a + b), len(str(max(a, b))), a, b)


def read_problems_jsonl(path: Union[str, Path]) -> List[Problem]:
    """Problems back from a prompt file written by ``common.write_prompts_jsonl``."""
    return read_prompts_jsonl(path, parse_prompt)
