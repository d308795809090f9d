"""The trainer's side of the rollout producer (``rollout.producer``), on every rank.

Every rank draws the prompts of steps step .. step + k in order (k = ``rollout.max_staleness``), so that all ranks
keep the same dataset position; rank 0 submits them to the producer, takes each step's finished rollout and
broadcasts it. The trainer never talks HTTP: it hands its weights over (``sync_weights``) and consumes rollouts
(``next``); the producer samples each step with a ``Sampler``.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import torch.distributed as dist

from ..rollout.client import SGLangClient
from ..rollout.producer import RolloutProducer, StepRollout
from ..rollout.protocol import SamplingParams
from ..rollout.rollout import RolloutConfig, generate_rollout
from ..rollout.servers import ServerGroup, ServerSet
from ..rollout.teacher import SGLangTeacher
from .config import TrainConfig
from .data import PromptDataset


def servers_from_config(c: TrainConfig, out: Path) -> ServerSet:
    """The student's rollout servers and, for ``teacher.source`` "sglang", the teacher's (started when embedded)."""
    student = ServerGroup(c.rollout.servers, c.model.student, c.rollout.embedded_servers, c.rollout.api_key)
    teacher = ServerGroup(c.teacher.servers, c.teacher.model, 1, c.teacher.api_key) \
        if c.teacher.source == "sglang" else None
    return ServerSet(student, teacher, out / "logs", c.rollout.max_concurrency, c.rollout.request_timeout_s)


class Sampler:
    """``await sampler(student, teacher, step, prompts)`` -> (step ``step``'s trajectories, n samples of each prompt
    seeded by the step, and the served teacher's scores of them or None); runs in the rollout producer's thread.
    ``mask_ids``: the token ids of ``rollout.mask_special_tokens``."""

    def __init__(self, config: TrainConfig, mask_ids: Sequence[int]):
        self.config, self.mask_ids = config, list(mask_ids)

    async def sample(self, client: SGLangClient, teacher_client: Optional[SGLangClient], prompt_ids, n_samples: int,
                     seed: int):
        """(``n_samples`` responses of ``client`` to each of ``prompt_ids`` with the rollout's sampling settings,
        the teacher's scores of them or None without ``teacher_client``): the training rollouts and the support-KL
        probe sample alike."""
        r = self.config.rollout
        sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                  max_new_tokens=r.max_new_tokens, stop_token_ids=list(r.stop_token_ids) or None)
        config = RolloutConfig(n_samples=n_samples, sampling=sampling, seed=seed, mask_token_ids=self.mask_ids)
        trajectories = await generate_rollout(client, prompt_ids, config)
        scores = None
        if teacher_client is not None:
            scores = await SGLangTeacher(teacher_client, self.config.teacher.top_k).score(trajectories)
        return trajectories, scores

    async def __call__(self, client: SGLangClient, teacher_client: Optional[SGLangClient], step: int, prompts):
        sampler = teacher_client if self.config.rollout.policy == "teacher" else client
        return await self.sample(sampler, teacher_client, [p.token_ids for p in prompts],
                                 self.config.rollout.samples_per_prompt, self.config.seed * 1000003 + step * 10007)


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

    def sync_weights(self, version: int, model) -> None:
        """Gather the full weights of ``model`` (a collective over each model-parallel group) and on rank 0 hand a
        CPU copy to the producer as ``version`` (the student the trainer holds when it starts step ``version``)."""
        from ..models.qwen3 import iter_hf_weights

        main = self.producer is not None
        weights = [(name, tensor.detach().cpu().clone()) if main else None for name, tensor in iter_hf_weights(model)]
        if main:
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


def staleness(versions, step: int, max_staleness: int) -> dict:
    """staleness_mean / staleness_max of a step's trajectories: step - the weight version that sampled each one.
    More than ``max_staleness`` is a bug of the producer, never trained on."""
    ages = [step - int(v) for v in versions]
    if ages and max(ages) > max_staleness:
        raise RuntimeError(f"step {step}: a trajectory of weight version {step - max(ages)} is older than "
                           f"rollout.max_staleness={max_staleness}")
    return {"staleness_mean": sum(ages) / max(len(ages), 1), "staleness_max": max(ages, default=0)}
