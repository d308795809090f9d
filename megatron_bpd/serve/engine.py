"""The inference engine: one thread owns the model and runs continuous batching.

Each iteration admits waiting requests (one batched prefill per admission; the n samples of a prompt share it),
then samples one token for every running sequence and runs one batched decode step over the KV cache. Finished
sequences leave the batch at once, new ones join at the next iteration. Control operations (abort, pause, weight
updates) run in the same thread between iterations, so they never race a forward pass.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_bpd.rollout.protocol import SamplingParams
from megatron_bpd.serve.runner import KVCache, Qwen3Runner
from megatron_bpd.serve.sampling import SamplingRow, sample

log = logging.getLogger(__name__)


@dataclass
class Sequence:
    """One sample being generated. ``notify(seq, n_tokens)`` is called from the engine thread after each new token
    (streaming only) and once when ``finish`` is set."""

    rid: str  # meta_info.id of this sample
    request_rid: str  # the rid a client aborts
    prompt: list[int]
    params: SamplingParams
    sampling: SamplingRow
    notify: Callable[["Sequence", int], None]
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top: list[tuple[list[float], list[int]]] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    input_top: list[tuple[list[float], list[int]] | None] = field(default_factory=list)
    finish: dict[str, Any] | None = None
    weight_version: str = "default"
    created: float = field(default_factory=time.monotonic)

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


class Engine:
    """Thread-safe front: ``submit``, ``abort``, ``call``; everything else runs in the engine thread."""

    def __init__(self, load: Callable[[], tuple[torch.nn.Module, Any]], max_running: int = 64):
        self._load = load
        self.max_running = max_running
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.model = self.tokenizer = self.runner = None
        self.weight_version = "default"
        self.paused = False
        self.num_finished = 0
        self._commands: queue.Queue = queue.Queue()
        self._waiting: deque[list[Sequence]] = deque()  # groups of samples sharing one prompt
        self._running: list[Sequence] = []
        self._cache: KVCache | None = None
        self._next_logits: torch.Tensor | None = None
        self._stop_ids: list[int] = []
        self._thread = threading.Thread(target=self._main, name="megatron-bpd-engine", daemon=True)

    # ---- thread-safe API ----
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._commands.put(None)
        self._thread.join(timeout=30)

    def submit(self, groups: list[list[Sequence]]) -> None:
        self._commands.put(lambda: self._waiting.extend(groups))

    def abort(self, rid: str | None, message: str = "Aborted by request") -> None:
        """Abort the sequences of request ``rid`` (all when None)."""
        self._commands.put(lambda: self._abort(rid, message))

    def call(self, fn: Callable[["Engine"], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` in the engine thread between iterations; returns a Future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn(self))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
        self._commands.put(run)
        return future

    @property
    def num_requests(self) -> int:
        """Sequences running or waiting (read from other threads: list() copies the deque atomically)."""
        return len(self._running) + sum(map(len, list(self._waiting)))

    # ---- engine thread ----
    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            self.runner = Qwen3Runner(self.model)
            eos = self.model.config.eos_token_id
            self._stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            self.loaded.set()
        except BaseException as exc:  # noqa: BLE001 - reported by /health
            self.load_error = exc
            log.exception("model loading failed")
            return
        while True:
            idle = self.paused or (not self._waiting and not self._running)
            if not self._drain(block=idle):
                return
            if self.paused:
                continue
            try:
                if self._waiting and len(self._running) < self.max_running:
                    self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine iteration failed")
                self._abort(None, f"internal error: {type(exc).__name__}: {exc}", status_code=500)
                self._cache = self._next_logits = None
                self._running = []

    def _drain(self, block: bool) -> bool:
        """Run queued commands (waiting for one when ``block``); False once stop() was called."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command is None:
                return False
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _admit(self) -> None:
        """Prefill waiting groups in one batch; they leave the queue only once the prefill succeeded."""
        count, rows = 0, len(self._running)
        while count < len(self._waiting) and (count == 0 or rows + len(self._waiting[count]) <= self.max_running):
            rows += len(self._waiting[count])
            count += 1
        groups = [self._waiting[i] for i in range(count)]
        lens = torch.tensor([len(g[0].prompt) for g in groups])
        tokens = torch.zeros(len(groups), int(lens.max()), dtype=torch.int64)
        for i, g in enumerate(groups):
            tokens[i, : lens[i]] = torch.tensor(g[0].prompt)
        all_logits = any(seq.wants_input_logprobs for g in groups for seq in g)
        cache = self.runner.new_cache(len(groups))
        logits = self.runner.forward(cache, tokens, lens, all_logits=all_logits)
        for _ in groups:
            self._waiting.popleft()
        keep_rows, joined = [], []
        for i, group in enumerate(groups):
            if any(seq.wants_input_logprobs for seq in group):
                lps, top = input_logprobs(logits[i, : lens[i]], tokens[i, : lens[i]], group[0].logprob_start_len,
                                          group[0].top_logprobs_num)
                for seq in group:
                    seq.input_logprobs, seq.input_top = lps, top
            if group[0].params.max_new_tokens == 0:
                for seq in group:
                    self._finish(seq, {"type": "length", "length": 0})
                continue
            keep_rows += [i] * len(group)
            joined += group
        if not joined:
            return
        rows_t = torch.tensor(keep_rows)
        last = logits[rows_t, lens[rows_t] - 1] if all_logits else logits[rows_t]
        new_cache = cache.select(rows_t)
        self._cache = new_cache if self._cache is None else KVCache.cat([self._cache, new_cache])
        self._next_logits = last if self._next_logits is None else torch.cat([self._next_logits, last])
        self._running += joined

    def _step(self) -> None:
        tokens, logprobs = sample(self._next_logits, [seq.sampling for seq in self._running])
        keep = []
        for b, seq in enumerate(self._running):
            token = int(tokens[b])
            seq.output_ids.append(token)
            if seq.return_logprob:
                seq.output_logprobs.append(float(logprobs[b, token]))
                if seq.top_logprobs_num > 0:
                    seq.output_top.append(top_k(logprobs[b], seq.top_logprobs_num))
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
            else:
                keep.append(b)
                if seq.stream:
                    seq.notify(seq, len(seq.output_ids))
        self._retain(keep)
        if self._running:
            step_tokens = tokens[torch.tensor(keep)][:, None]
            self._next_logits = self.runner.forward(self._cache, step_tokens, torch.ones(len(keep), dtype=torch.int64))

    def _retain(self, keep: list[int]) -> None:
        """Keep running rows ``keep`` (indices into the current batch) and drop the rest from the cache."""
        if len(keep) == len(self._running):
            return
        self._running = [self._running[b] for b in keep]
        if not keep:
            self._cache = self._next_logits = None
            return
        rows = torch.tensor(keep)
        self._cache = self._cache.select(rows)
        self._next_logits = self._next_logits[rows]

    def _finish_reason(self, seq: Sequence, token: int) -> dict[str, Any] | None:
        p = seq.params
        if token in (p.stop_token_ids or []) or (not p.ignore_eos and token in self._stop_ids):
            return {"type": "stop", "matched": token}
        if p.stop:
            text = self.tokenizer.decode(seq.output_ids[-64:], skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in text:
                    return {"type": "stop", "matched": s}
        if len(seq.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        return None

    def _finish(self, seq: Sequence, reason: dict[str, Any]) -> None:
        seq.finish, seq.weight_version = reason, self.weight_version
        self.num_finished += 1
        seq.notify(seq, len(seq.output_ids))

    def _abort(self, rid: str | None, message: str, status_code: int = 200) -> None:
        match = lambda seq: (rid is None or seq.request_rid == rid) and seq.finish is None  # noqa: E731
        reason = {"type": "abort", "message": message, "status_code": status_code, "err_type": None}
        for group in [g for g in self._waiting if match(g[0])]:
            self._waiting.remove(group)
            for seq in group:
                self._finish(seq, reason)
        keep = [b for b, seq in enumerate(self._running) if seq.finish is None and not match(seq)]
        for seq in self._running:
            if match(seq):
                self._finish(seq, reason)
        self._retain(keep)


def input_logprobs(logits: torch.Tensor, tokens: torch.Tensor, start: int, k: int):
    """SGLang's input log-probs for positions start..L-1 of a prompt: entry i is log_softmax(logits[p - 1])[tokens[p]]
    at p = start + i (temperature 1), entry 0 is None; likewise the top-k rows. logits [L, V], tokens [L]."""
    length = tokens.shape[0]
    logprobs = torch.log_softmax(logits[start : length - 1].float(), dim=-1)  # predicts positions start+1..L-1
    values = logprobs.gather(1, tokens[start + 1 :, None])[:, 0].tolist()
    tops = [top_k(row, k) for row in logprobs] if k > 0 else []
    return [None] + values, ([None] + tops if k > 0 else [])


def top_k(logprobs: torch.Tensor, k: int) -> tuple[list[float], list[int]]:
    """The k largest entries of a [V] log-prob row, descending: (log-probs, token ids)."""
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[0]))
    return values.tolist(), ids.tolist()
