"""Prompts for rollouts: a JSONL file read once, tokenized with the student's chat template, served in a seeded
order whose position is part of every checkpoint (a resumed run continues with the same prompts)."""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional


@dataclass
class Prompt:
    index: int
    token_ids: List[int]
    answer: Optional[str]
    difficulty: Optional[str] = None  # the row's ``difficulty_key`` field, for metrics grouped by difficulty


class PromptDataset:
    """``next_batch(n)`` yields prompts in a per-epoch shuffled order (seeded); ``state()``/``load_state()``."""

    def __init__(self, path: str, tokenizer, template: str, apply_chat_template: bool, max_prompt_len: int,
                 seed: int, shuffle: bool = True, difficulty_key: str = "difficulty"):
        self.prompts = [self._encode(i, row, tokenizer, template, apply_chat_template, max_prompt_len, difficulty_key)
                        for i, row in enumerate(_read_jsonl(path))]
        if not self.prompts:
            raise ValueError(f"no prompts in {path}")
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    @staticmethod
    def _encode(index, row, tokenizer, template, apply_chat_template, max_prompt_len, difficulty_key) -> Prompt:
        text = row.get("prompt", row.get("problem"))
        if text is None:
            raise ValueError(f"prompt {index} has neither a 'prompt' nor a 'problem' field: {sorted(row)}")
        if "problem" in row and "prompt" not in row:
            text = template.format(problem=text)
        if apply_chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text)["input_ids"]
        if len(ids) > max_prompt_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, more than data.max_prompt_len={max_prompt_len}")
        answer, difficulty = row.get("answer"), row.get(difficulty_key)
        return Prompt(index, list(ids), None if answer is None else str(answer),
                      None if difficulty is None else str(difficulty))

    def _epoch_order(self) -> List[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> List[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


def _read_jsonl(path: str) -> list:
    rows = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from err
    return rows
