"""The trainer's side of the rollout producer (``rollout.producer``), on every rank.

Every rank draws the prompts of steps step .. step + k in order (k = ``rollout.max_staleness``), so that all ranks
keep the same dataset position; rank 0 submits them to the producer, takes each step's finished rollout and
broadcasts it. The trainer never talks HTTP: it hands its weights over (``push``) and consumes rollouts (``next``).
"""

from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from ..rollout.producer import RolloutProducer, StepRollout
from ..rollout.servers import ServerGroup, ServerSet
from .config import TrainConfig
from .data import PromptDataset


def servers_from_config(c: TrainConfig, out: Path) -> ServerSet:
    """The student's rollout servers and, for ``teacher.source`` "sglang", the teacher's (started when embedded)."""
    student = ServerGroup(c.rollout.servers, c.model.student, c.rollout.embedded_servers, c.rollout.api_key)
    teacher = ServerGroup(c.teacher.servers, c.teacher.model, 1, c.teacher.api_key) \
        if c.teacher.source == "sglang" else None
    return ServerSet(student, teacher, out / "logs", c.rollout.max_concurrency, c.rollout.request_timeout_s)


class RolloutFeed:
    """``next(step)`` -> (the step's prompts, its StepRollout) on every rank. ``servers`` (rank 0 only) back a
    RolloutProducer that samples with ``generate(student, teacher, step, prompts)``; ``preloaded``: rollouts a
    checkpoint kept (steps first_step .. first_step + k - 1), which are not sampled again."""

    def __init__(self, config: TrainConfig, dataset: PromptDataset, servers: Optional[ServerSet], generate,
                 export_dir: Path, first_step: int, preloaded: List[StepRollout] = ()):
        self.config, self.dataset = config, dataset
        self.k = config.rollout.max_staleness
        self.producer = None
        if servers is not None:
            self.producer = RolloutProducer(servers, generate, self.k, first_step, export_dir, config.model.student,
                                            check_versions=config.rollout.policy == "student")
            for rollout in preloaded:
                self.producer.preload(rollout)
        self.preloaded = {r.step for r in preloaded}
        self.prompts, self.data_states = {}, {}
        self.drawn = first_step

    def push(self, version: int, weights) -> None:
        """Rank 0: the trainer's weights of ``version`` (the student it holds when it starts step ``version``)."""
        self.producer.push(version, weights)

    def call(self, version: int, fn):
        """Rank 0: ``await fn(student_client, teacher_client)`` on servers holding weight ``version``."""
        return self.producer.call(version, fn)

    def next(self, step: int):
        """Draw (and on rank 0 submit) the prompts of steps up to step + k, then wait for step ``step``'s rollout."""
        while self.drawn <= min(step + self.k, self.config.steps - 1):
            self.data_states[self.drawn] = self.dataset.state()
            self.prompts[self.drawn] = self.dataset.next_batch(self.config.rollout.prompts_per_step)
            if self.producer is not None and self.drawn not in self.preloaded:
                self.producer.submit(self.drawn, self.prompts[self.drawn])
            self.drawn += 1
        payload = [self.producer.get(step) if self.producer is not None else None]
        dist.broadcast_object_list(payload, src=0)
        self.data_states.pop(step, None)
        return self.prompts.pop(step), payload[0]

    def data_state(self, next_step: int) -> dict:
        """The dataset position where step ``next_step``'s prompts begin (what a checkpoint stores)."""
        return self.data_states.get(next_step, self.dataset.state())

    def pending(self, next_step: int) -> List[StepRollout]:
        """Rank 0: the finished rollouts of the drawn steps from ``next_step`` on (waits for them)."""
        return self.producer.finished(range(next_step, self.drawn)) if self.producer is not None else []

    def close(self, next_step: int) -> None:
        """Stop the producer (the servers end on the newest weights) and rewind the dataset to ``next_step``'s
        prompts, so that a later ``run`` draws them again."""
        self.dataset.load_state(self.data_state(next_step))
        if self.producer is not None:
            self.producer.close()
