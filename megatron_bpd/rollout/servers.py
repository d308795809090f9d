"""The servers of a run: the student's rollout servers and the teacher's, either given as URLs (SGLang servers or
routers) or started here as embedded ``megatron_bpd.serve`` subprocesses, which are restarted when they die."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from megatron_bpd.rollout.client import API_KEY_ENV, ClientConfig, SGLangClient
from megatron_bpd.rollout.embedded import EmbeddedServer


@dataclass
class ServerGroup:
    """``servers``: URLs, or ["embedded"] to start ``count`` embedded servers on ``model`` (an HF folder).
    ``api_key``: the servers' ``--api-key`` (None: $SGLANG_API_KEY if set)."""

    servers: list
    model: str
    count: int = 1
    api_key: Optional[str] = None

    @property
    def embedded(self) -> bool:
        return list(self.servers) == ["embedded"]

    @property
    def key(self) -> Optional[str]:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


class ServerSet:
    """The student servers and (optionally) the teacher servers; ``call`` runs a coroutine against fresh clients."""

    def __init__(self, student: ServerGroup, teacher: Optional[ServerGroup], log_dir: Path, max_concurrency: int = 64,
                 request_timeout_s: float = 3600.0):
        self.student, self.teacher, self.log_dir = student, teacher, Path(log_dir)
        self.max_concurrency, self.request_timeout_s = max_concurrency, request_timeout_s
        self.embedded = []  # (role, EmbeddedServer)
        self.student_urls = self._urls("student", student)
        self.teacher_urls = self._urls("teacher", teacher) if teacher is not None else None

    def _start(self, group: ServerGroup, model, name: str, version: Optional[str] = None):
        extra = ["--weight-version", version] if version is not None else []
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return EmbeddedServer(model, log_path=self.log_dir / f"{name}.log", env=env, extra_args=extra,
                              api_key=group.key).start()

    def _urls(self, role: str, group: ServerGroup) -> list:
        if not group.embedded:
            return list(group.servers)
        started = [self._start(group, group.model, f"{role}-{i}") for i in range(group.count)]
        self.embedded += [(role, s) for s in started]
        return [s.url for s in started]

    def client(self, role: str = "student") -> SGLangClient:
        group, urls = (self.student, self.student_urls) if role == "student" else (self.teacher, self.teacher_urls)
        return SGLangClient(ClientConfig(urls=urls, max_concurrency=self.max_concurrency,
                                         request_timeout_s=self.request_timeout_s, api_key=group.key))

    def call(self, fn: Callable, teacher: bool = True, restart: Callable[[], tuple] = lambda: (None, None)):
        """``await fn(student_client, teacher_client_or_None)`` in a fresh event loop. When it fails and an
        embedded server has died, the dead servers are restarted and the call is retried once; ``restart()`` gives
        the (model folder, weight version) a restarted student server starts from (None: its first model)."""
        async def run():
            async with self.client("student") as student:
                if teacher and self.teacher_urls is not None:
                    async with self.client("teacher") as teacher_client:
                        return await fn(student, teacher_client)
                return await fn(student, None)

        try:
            return asyncio.run(run())
        except Exception:
            if not self.restart_dead(*restart()):
                raise
            return asyncio.run(run())

    def restart_dead(self, student_model=None, version: Optional[str] = None) -> bool:
        """Restart the embedded servers whose process ended (students on ``student_model`` reporting ``version``
        when given); True if any was restarted."""
        restarted = False
        for i, (role, server) in enumerate(self.embedded):
            if server.proc is None or server.proc.poll() is None:
                continue
            group = self.student if role == "student" else self.teacher
            model = student_model if role == "student" and student_model is not None else group.model
            replacement = self._start(group, model, f"{role}-restarted-{i}-{time.time():.0f}",
                                      version if role == "student" else None)
            urls = self.student_urls if role == "student" else self.teacher_urls
            urls[urls.index(server.url)] = replacement.url
            self.embedded[i] = (role, replacement)
            restarted = True
        return restarted

    def stop(self) -> None:
        for _, server in self.embedded:
            server.stop()
