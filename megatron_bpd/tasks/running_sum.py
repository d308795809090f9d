"""Running sum over a numbered list: the long-horizon task, with the number of items as its horizon knob.

A problem sums ``items`` two-digit numbers. The prompt numbers them; the solution keeps a running total, one line
per item, each line restating the total so far, the next item (looked up by its number) and their sum, with every
number of the lines written least significant digit first; then it states the answer, written as usual::

    prompt:   "Sum step by step: 1:37 2:82 3:15"
    solution: "1: 73
               2: 73+28=911
               3: 911+51=431
               answer: 134
               \\boxed{134}"

(37 + 82 = 119 reads 73 + 28 = 911; 119 + 15 = 134 reads 911 + 51 = 431.) Digits least significant first make each
written digit depend on the digits before it (the carry flows the way the line is written): with the usual order
a first teacher made ~2% of its lines wrong in a tens digit, the carry it had to foresee (docs/results/long_horizon.md).

The response has ``items + 2`` lines of about 15 tokens each with a digit-per-token tokenizer (24 items: ~370
tokens, 26 lines), and every line depends on the total of the line before it, so an error anywhere carries to
the answer unless a later line repairs it (recomputing the last sum from its operands, which the line shows).
The checker is the addition task's (``answer: N``, optionally ``\\boxed{N}``). Two problems with the same items in
another order share their answer and every partial-sum skill, so ``key`` is the sorted items: splits that must
not overlap compare keys.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Hashable, Iterable, List, Tuple

from megatron_bpd.tasks.common import Difficulties, draw_dataset

PROMPT_PREFIX = "Sum step by step:"
ITEM_RANGE = (10, 99)


@dataclass(frozen=True)
class SumProblem:
    prompt_text: str
    solution_text: str
    answer: str
    items: Tuple[int, ...]

    @property
    def difficulty(self) -> int:
        """The horizon: the number of items (one solution line each)."""
        return len(self.items)

    @property
    def key(self) -> Tuple[int, ...]:
        """Identity for split disjointness: the multiset of items (a reordered list is the same problem)."""
        return tuple(sorted(self.items))

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for a correct solution: 16 per item line (index, total, item, sum) + answer lines."""
        return 16 * len(self.items) + 32


def reversed_digits(n: int) -> str:
    """``n`` written least significant digit first (119 -> "911")."""
    return str(n)[::-1]


def solution_lines(items: Tuple[int, ...]) -> List[str]:
    """The worked running sum of ``items``: ``k: total+item=new`` per item, digits least significant first (the
    first line restates item 1), then the answer in the usual order."""
    r = reversed_digits
    total, lines = items[0], [f"1: {r(items[0])}"]
    for k, item in enumerate(items[1:], start=2):
        lines.append(f"{k}: {r(total)}+{r(item)}={r(total + item)}")
        total += item
    return lines + [f"answer: {total}", f"\\boxed{{{total}}}"]


def make_sum_problem(items: Tuple[int, ...]) -> SumProblem:
    if not items:
        raise ValueError("a running-sum problem needs at least one item")
    prompt = " ".join([PROMPT_PREFIX] + [f"{k}:{x}" for k, x in enumerate(items, start=1)])
    return SumProblem(prompt, "\n".join(solution_lines(items)), str(sum(items)), tuple(items))


def draw_sum_problem(rng: random.Random, n_items: int) -> SumProblem:
    """``n_items`` items drawn uniformly from ``ITEM_RANGE``."""
    if n_items < 1:
        raise ValueError(f"items={n_items}: need at least 1")
    return make_sum_problem(tuple(rng.randint(*ITEM_RANGE) for _ in range(n_items)))


_PROMPT = re.compile(re.escape(PROMPT_PREFIX) + r"((?: \d+:\d+)+)$")


def parse_sum_prompt(prompt: str) -> SumProblem:
    """The problem back from its prompt text (the items must be numbered 1..n in order)."""
    m = _PROMPT.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"not a running-sum prompt: {prompt!r}")
    pairs = [tuple(map(int, p.split(":"))) for p in m.group(1).split()]
    if [k for k, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise ValueError(f"running-sum prompt with items not numbered 1..n: {prompt!r}")
    return make_sum_problem(tuple(x for _, x in pairs))


def make_sum_dataset(n: int, seed: int, items: Difficulties = (2, 24), exclude: Iterable[Hashable] = ()) -> list:
    """``n`` distinct problems (by ``key``: no reordered duplicates), item counts uniform over ``items``."""
    return draw_dataset(draw_sum_problem, n, seed, items, exclude)


def sum_corpus(seed: int = 0, n: int = 600) -> List[str]:
    """Prompt + solution texts covering the task vocabulary (for training its tokenizer)."""
    return [p.prompt_text + "\n" + p.solution_text + "\n" for p in make_sum_dataset(n, seed, (1, 30))]
