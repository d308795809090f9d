"""Rollouts overlapped with training, with bounded staleness (``max_staleness`` k; 0 is the synchronous loop).

Weight versions are numbered by training step: version s is the student the trainer holds when it starts step s.
The trainer hands over each version (``push``) and asks for each step's rollout (``submit``, then ``get``); one
background thread works through the steps in order and samples step s with version

    v(s) = max(s - k, first)     (first: the version the run started from),

so that every trajectory the trainer trains on at step s has staleness s - v(s) <= k by construction: when version
v(s) is not there yet the producer waits for the trainer (``time_wait_train``) instead of sampling with older
weights, and nothing is ever dropped. A weight update happens only between two steps' rollouts, when no request is
in flight (pause -> flush -> load -> continue on idle servers): no request is served partly by old and partly by new
weights, and each trajectory's server-reported ``weight_version`` must be v(s) (anything else is an error).

Because v(s) does not depend on timing, a run is deterministic whatever the overlap; a checkpoint after step r - 1
stores the finished rollouts of steps r .. r + k - 1 (``finished``) so that a resumed run continues exactly.

A server that dies is restarted (students from the export of the version they served) and the step's rollout is
sampled again from scratch, with the same seeds (``resampled_trajectories`` counts the discarded attempts).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import torch

from megatron_bpd.rollout.servers import ServerSet
from megatron_bpd.rollout.types import TeacherScores, TrajectoryBatch
from megatron_bpd.rollout.weight_sync import DiskWeightSync, NamedTensors


@dataclass
class StepRollout:
    """Step ``step``'s trajectories (and teacher scores), sampled with weight ``version``; ``stats``: the
    producer's timings for it (time_generate, time_weight_push, time_wait_train, rollout_tokens_per_s,
    resampled_trajectories)."""

    step: int
    version: int
    trajectories: TrajectoryBatch
    teacher: Optional[TeacherScores]
    stats: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        """Tensors, numbers, strings and lists only (``torch.load(weights_only=True)`` reads it back)."""
        t = self.trajectories
        state = {"step": self.step, "version": self.version, "stats": self.stats,
                 "trajectories": {k: getattr(t, k) for k in TrajectoryBatch.__dataclass_fields__}}
        if self.teacher is not None:
            state["teacher"] = {"token_logprobs": self.teacher.token_logprobs, "topk_ids": self.teacher.topk_ids,
                                "topk_logprobs": self.teacher.topk_logprobs}
        return state

    @classmethod
    def from_state(cls, state: dict) -> "StepRollout":
        teacher = TeacherScores(**state["teacher"]) if "teacher" in state else None
        return cls(state["step"], state["version"], TrajectoryBatch(**state["trajectories"]), teacher,
                   dict(state["stats"]))


class _Closed(Exception):
    """The trainer closed the producer while it waited for weights."""


@dataclass
class _Call:
    """A request run on the servers at a weight version, in order with the steps' rollouts (``RolloutProducer.call``)."""

    version: int
    fn: Callable
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None


Generate = Callable[[Any, Optional[Any], int, Any], Awaitable[tuple]]


class RolloutProducer:
    """``generate(student_client, teacher_client_or_None, step, job) -> (TrajectoryBatch, TeacherScores | None)``
    samples one step; ``export_dir``: where each pushed version is written (DiskWeightSync) and restarted student
    servers load it from. ``check_versions``: require every trajectory's server-reported weight version to be the
    step's (False when ``generate`` samples from other servers, e.g. the teacher's for the off-policy control)."""

    def __init__(self, servers: ServerSet, generate: Generate, max_staleness: int, first_version: int,
                 export_dir: Path, hf_config_dir: str, check_versions: bool = True):
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.servers, self.generate, self.max_staleness = servers, generate, max_staleness
        self.first_version, self.export_dir, self.hf_config_dir = first_version, Path(export_dir), hf_config_dir
        self.check_versions = check_versions
        self.server_version: Optional[int] = None
        self._jobs: queue.Queue = queue.Queue()
        self._versions: queue.Queue = queue.Queue()
        self._handed = first_version - 1
        self._results: dict = {}
        self._preloaded: set = set()
        self._error: Optional[BaseException] = None
        self._done = threading.Condition()
        self._idle = 0.0  # time waiting for the trainer since the last finished step
        self._closing = False
        self._thread = threading.Thread(target=self._main, name="rollout-producer", daemon=True)
        self._thread.start()

    # ---- trainer side (rank 0) ----
    def version_for(self, step: int) -> int:
        return max(step - self.max_staleness, self.first_version)

    def submit(self, step: int, job: Any) -> None:
        """Queue step ``step``'s rollout (steps in increasing order)."""
        self._jobs.put((step, job))

    def preload(self, rollout: StepRollout) -> None:
        """A rollout finished before a restart (from a checkpoint): ``get`` returns it, nothing is sampled."""
        with self._done:
            self._results[rollout.step] = rollout
            self._preloaded.add(rollout.step)

    def push(self, version: int, weights: NamedTensors) -> None:
        """Hand over the trainer's weights of ``version`` (the next one; a CPU copy the producer keeps)."""
        if version != self._handed + 1:
            raise ValueError(f"weight version {version} handed after {self._handed}: versions go one by one")
        self._handed = version
        self._versions.put((version, weights))

    def get(self, step: int) -> StepRollout:
        """Wait for step ``step``'s rollout and take it."""
        with self._done:
            while step not in self._results or self._results[step] is None:
                if self._error is not None:
                    raise RuntimeError(f"the rollout producer failed before step {step}") from self._error
                if not self._thread.is_alive():
                    raise RuntimeError(f"the rollout producer stopped before step {step}")
                self._done.wait(timeout=1.0)
            return self._results.pop(step)

    def finished(self, steps) -> list:
        """Wait for the rollouts of ``steps`` (submitted, not yet taken) and return them, keeping them for ``get``
        (what a checkpoint stores)."""
        out = []
        for step in steps:
            rollout = self.get(step)
            with self._done:
                self._results[step] = rollout
            out.append(rollout)
        return out

    def call(self, version: int, fn: Callable) -> Any:
        """``await fn(student_client, teacher_client_or_None)`` once the student servers hold ``version`` (after the
        rollouts submitted before it; versions only move forward): e.g. a held-out evaluation of the trainer's
        current weights. Blocks until it has run."""
        request = _Call(version, fn)
        self._jobs.put((None, request))
        while not request.done.wait(timeout=1.0):
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError("the rollout producer stopped before a call at version "
                                   f"{version}") from self._error
        if request.error is not None:
            raise request.error
        return request.result

    def close(self) -> None:
        """Skip the steps not sampled yet, push the newest handed version (the servers end with the trainer's final
        weights) and stop the thread."""
        self._closing = True
        self._jobs.put((None, None))
        self._versions.put((None, None))  # wakes a thread that waits for a version the trainer will not hand over
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("the rollout producer failed") from self._error

    # ---- the producer thread ----
    def _main(self) -> None:
        try:
            while True:
                clock = time.perf_counter()
                step, job = self._jobs.get()
                self._idle += time.perf_counter() - clock
                if isinstance(job, _Call):
                    self._run_call(job)
                    continue
                if step is None:
                    break
                if self._closing:
                    continue
                with self._done:
                    if step in self._preloaded:
                        raise ValueError(f"step {step} was both preloaded and submitted")
                    self._results[step] = None
                push_time = self._advance(self.version_for(step))
                rollout = self._sample(step, job)
                rollout.stats.update(time_weight_push=push_time, time_wait_train=self._idle)
                self._idle = 0.0
                with self._done:
                    self._results[step] = rollout
                    self._done.notify_all()
            if self._handed > (self.server_version if self.server_version is not None else self.first_version - 1):
                self._advance(self._handed)
        except _Closed:
            pass
        except BaseException as exc:  # reported to the trainer by get() / close()
            self._error = exc
        finally:
            with self._done:
                self._done.notify_all()

    def _run_call(self, request: _Call) -> None:
        try:
            self._advance(request.version)
            request.result = self.servers.call(request.fn, restart=self._restart_point)
        except _Closed:
            raise
        except Exception as exc:  # reported to the caller, the producer goes on
            request.error = exc
        finally:
            request.done.set()

    def _advance(self, version: int) -> float:
        """Bring the student servers to ``version`` (waiting for the trainer to hand it over); returns the push
        time (0 when they are there already)."""
        if self.server_version == version:
            return 0.0
        while True:
            clock = time.perf_counter()
            handed, weights = self._versions.get()
            self._idle += time.perf_counter() - clock
            if handed is None:
                raise _Closed()
            if handed == version:
                break
        clock = time.perf_counter()
        sync = lambda client, _: DiskWeightSync(client, self.export_dir, self.hf_config_dir).update(  # noqa: E731
            weights, str(version))
        self.servers.call(sync, teacher=False)
        self.server_version = version
        return time.perf_counter() - clock

    def _restart_point(self) -> tuple:
        if self.server_version is None:
            return None, None
        return self.export_dir / str(self.server_version), str(self.server_version)

    def _sample(self, step: int, job: Any) -> StepRollout:
        attempts = []

        async def sample(student, teacher):
            attempts.append(step)
            return await self.generate(student, teacher, step, job)

        clock = time.perf_counter()
        trajectories, teacher = self.servers.call(sample, restart=self._restart_point)
        elapsed = time.perf_counter() - clock
        version = str(self.server_version)
        wrong = sorted({v for v in trajectories.weight_version if v != version}, key=str)
        if wrong and self.check_versions:
            raise RuntimeError(f"step {step}: servers reported weight_version {wrong} for trajectories sampled after "
                               f"version {version} was pushed")
        tokens = sum(len(r) for r in trajectories.response_ids)
        stats = {"time_generate": elapsed, "rollout_tokens_per_s": tokens / max(elapsed, 1e-9),
                 "resampled_trajectories": (len(attempts) - 1) * len(trajectories)}
        return StepRollout(step, self.server_version, trajectories, teacher, stats)


def save_rollouts(rollouts: list, file: Path) -> None:
    torch.save([r.to_state() for r in rollouts], file)


def load_rollouts(file: Path) -> list:
    return [StepRollout.from_state(state) for state in torch.load(file, weights_only=True)] if file.is_file() else []
