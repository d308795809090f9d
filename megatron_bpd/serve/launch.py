"""Start the project's SGLang-protocol server as a subprocess on a free loopback port (CPU runs and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """``python -m megatron_bpd.serve --model MODEL`` on 127.0.0.1:<free port>, logging to ``log_dir``.

    ``start()`` returns once ``/health`` answers 200 (the model is loaded); ``stop()`` ends the process.
    Usable as a context manager.
    """

    def __init__(self, model: str | Path, log_dir: str | Path, *extra_args: str, threads: int = 1):
        self.model, self.port = Path(model), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"server-{self.port}.log"
        self.extra_args, self.threads = extra_args, threads
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> "EmbeddedServer":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        cmd = [sys.executable, "-m", "megatron_bpd.serve", "--model", str(self.model), "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"embedded server on {self.url} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
