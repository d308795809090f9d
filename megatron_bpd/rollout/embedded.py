"""The project's SGLang-protocol server (``megatron_bpd.serve``) in a subprocess on a free loopback port: for CPU
training runs (``rollout.servers: [embedded]``), ``eval --model`` and tests. It starts ``python -m
megatron_bpd.serve`` and speaks HTTP to it, importing nothing of ``serve`` (which builds on ``rollout``'s protocol):
the dependency between the two packages runs one way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding megatron_bpd/


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """``with EmbeddedServer(model_dir) as server: ... server.url ...``: starts ``python -m megatron_bpd.serve``,
    waits until ``/health`` answers 200 (or raises with the log's tail when the process dies or times out), and
    terminates it on exit (SIGTERM, then SIGKILL after ``stop_timeout_s``). ``api_key``: start it with
    ``--api-key`` (clients must send the key; /health stays open)."""

    def __init__(self, model: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout_s: float = 600.0, stop_timeout_s: float = 15.0, env: dict | None = None,
                 api_key: str | None = None):
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.extra_args = list(extra_args) + (["--api-key", api_key] if api_key else [])
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "megatron_bpd.serve", "--model", self.model, "--host", self.host,
                "--port", str(self.port), *self.extra_args]

    def start(self) -> "EmbeddedServer":
        """Spawn the process and wait until it is healthy."""
        self.spawn()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def spawn(self) -> "EmbeddedServer":
        """Start the process without waiting (start several, then ``wait_healthy`` each: imports dominate)."""
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "w")
            out = self._log_file
        else:
            out = subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        return self

    def _log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log: pass log_path to keep the server's output)"
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self) -> "EmbeddedServer":
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the embedded server ({' '.join(self.command())}) exited with "
                                   f"{self.proc.returncode} before it was healthy:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the embedded server on {self.url} was not healthy after {self.startup_timeout_s}"
                                   f" s:\n{self._log_tail()}")
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of fault tolerance)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
