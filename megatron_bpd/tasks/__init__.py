"""Synthetic reasoning task for the CPU demo and the toy reproduction: column addition with a scratchpad, its
exact checker, a task tokenizer, SFT of tiny Qwen3 models and a cached teacher/student pair.

- ``arithmetic``: ``Problem``, ``make_problem``, ``make_dataset``, ``check``, ``write_prompts_jsonl``
- ``models``: ``task_tokenizer``, ``make_task_model``
- ``sft``: ``train_sft``, ``accuracy``, ``generate``, ``prepare_teacher_and_student``
- ``python -m megatron_bpd.tasks --out DIR``
"""

from megatron_bpd.tasks.arithmetic import (Problem, check, extract_answer, make_dataset, make_problem,
                                           read_problems_jsonl, write_prompts_jsonl)

__all__ = ["Problem", "check", "extract_answer", "make_dataset", "make_problem", "read_problems_jsonl",
           "write_prompts_jsonl"]
