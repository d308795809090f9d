"""The synthetic tasks by name: what the trainer's prompt files, the demo (``--task``), the studies and SFT need
to know of a task, and the dev / test splits of a study.

- ``addition``: column addition, one line per digit column; horizon = digits (today's demo task, 2-4 digits).
- ``running_sum``: a running total over a numbered list, one line per item; horizon = items (24 items: ~370
  response tokens, 26 lines).
Both answer with ``answer: N`` lines checked exactly by ``common.check`` (the trainer's ``answer_checker:
arithmetic``). Each task's shipped teacher and student live in ``data/task_models/<models>/``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

from megatron_bpd.tasks import arithmetic, running_sum
from megatron_bpd.tasks.common import Difficulties, difficulty_choices, draw_dataset

TASK_MODELS = Path(__file__).resolve().parents[1] / "data" / "task_models"


@dataclass(frozen=True)
class Task:
    """One task: ``draw(rng, difficulty)`` a problem, ``parse_prompt(text)`` it back, ``corpus(seed)`` texts for
    its tokenizer; ``difficulties`` the range its shipped pair was trained on, ``models`` their folder."""

    name: str
    draw: Callable[[random.Random, int], Any]
    parse_prompt: Callable[[str], Any]
    corpus: Callable[[int], List[str]]
    difficulties: Tuple[int, int]
    models: Path
    difficulty_name: str  # what the horizon knob counts
    version: int = 1  # of the problem format: a cached model of an older format is not reused (``tasks.sft``)

    def max_new_tokens(self, difficulties: Difficulties = None) -> int:
        """A generation budget for a correct solution of every problem up to the largest of ``difficulties``."""
        return self.draw(random.Random(0), max(difficulty_choices(difficulties or self.difficulties))).max_new_tokens

    def dataset(self, n: int, seed: int, difficulties: Difficulties = None, exclude=()) -> list:
        """``n`` distinct problems (by ``key``), none whose key is in ``exclude``."""
        return draw_dataset(self.draw, n, seed, difficulties or self.difficulties, exclude)


TASKS: Dict[str, Task] = {
    "addition": Task("addition", arithmetic.make_problem, arithmetic.parse_prompt,
                     lambda seed: arithmetic.task_corpus(seed, n=600, digits=(1, 8)), (2, 4), TASK_MODELS, "digits"),
    "running_sum": Task("running_sum", running_sum.draw_sum_problem, running_sum.parse_sum_prompt,
                        running_sum.sum_corpus, (2, 24), TASK_MODELS / "running_sum", "items",
                        version=2),  # 2: lines least significant digit first
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def splits(task: Task, seed: int, sizes: Dict[str, int], difficulties: Dict[str, Difficulties] | None = None,
           exclude: Sequence[Any] = ()) -> Dict[str, list]:
    """Disjoint splits of ``task`` by problem ``key`` (operand-swapped or reordered problems are one problem), drawn
    in the order of ``sizes`` (e.g. ``{"train": 20000, "dev": 200, "test": 500}``), each with its own seed
    (``seed * 16 + i``) and difficulty range (default: the task's). ``exclude``: problems (e.g. an SFT set) no
    split may contain."""
    taken = {p.key for p in exclude}
    out: Dict[str, list] = {}
    for i, (name, n) in enumerate(sizes.items()):
        out[name] = task.dataset(n, seed * 16 + i, (difficulties or {}).get(name), taken)
        taken |= {p.key for p in out[name]}
    return out


STUDY_SPLIT_SIZES = {"sft": 20000, "train": 2000, "dev": 300, "test": 500}


def study_splits(task: Task, seed: int = 0, sizes: Dict[str, int] = STUDY_SPLIT_SIZES,
                 horizon: Difficulties = None) -> Dict[str, list]:
    """The splits of a study on ``task``: ``sft`` (what its teacher and student were fine-tuned on, over the task's
    difficulties), then ``train`` (the OPD prompts), ``dev`` (every choice: schedule, lr, tau, steps) and ``test``
    (reported, never used for a choice) at ``horizon`` (default: the task's difficulties; an int for a study at one
    horizon), pairwise disjoint by ``key``. The ``sft`` split does not depend on ``horizon``. The addition task's
    shipped pair predates these splits and was fine-tuned on ``tasks.sft.datasets``; its study splits exclude that
    set as well."""
    exclude = []
    if task.name == "addition":
        from megatron_bpd.tasks.sft import PrepConfig, datasets

        exclude = datasets(PrepConfig(seed=seed))[0]
    levels = {name: (task.difficulties if name == "sft" else horizon) for name in sizes}
    return splits(task, seed, sizes, levels, exclude=exclude)
