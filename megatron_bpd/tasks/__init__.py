"""Synthetic reasoning tasks for the CPU demo and the studies, each with an exact checker and a horizon knob, a
task tokenizer, SFT of tiny Qwen3 models and a cached teacher/student pair.

- ``registry``: the tasks by name (``addition``, ``running_sum``), ``get_task``, disjoint ``splits``
- ``arithmetic``: column addition (``Problem``, ``make_problem``, ``make_dataset``); ``running_sum``: running totals
- ``common``: the answer format and ``check``, ``draw_dataset``, ``write_prompts_jsonl``
- ``models``: ``task_tokenizer``, ``make_task_model``
- ``sft``: ``train_sft``, ``accuracy``, ``generate``, ``prepare_teacher_and_student``
- ``python -m megatron_bpd.tasks --out DIR``
"""

from megatron_bpd.tasks.arithmetic import Problem, make_dataset, make_problem, read_problems_jsonl
from megatron_bpd.tasks.common import check, extract_answer, write_prompts_jsonl
from megatron_bpd.tasks.registry import TASKS, get_task, splits

__all__ = ["Problem", "TASKS", "check", "extract_answer", "get_task", "make_dataset", "make_problem",
           "read_problems_jsonl", "splits", "write_prompts_jsonl"]
