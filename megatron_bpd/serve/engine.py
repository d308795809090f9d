"""The inference engine: one thread owns the model and runs continuous batching.

Running sequences live in the fixed slots of a preallocated KV cache (``max_running`` of them), always in the first
ones: B running sequences hold slots 0..B-1. Each iteration admits waiting samples into free slots (one batched
prefill, each distinct prompt once: the n samples of a prompt share it), then samples one token for every running
sequence at once (``SlotSampling``) and runs one batched decode step over slots 0..B-1. A finished sequence frees its
slot at once; when that leaves a hole, the sequence in the highest slot moves into it (its cache and sampling state:
one copy of that row), so that a decode step reads the cache as views and never gathers it. Control operations
(abort, pause, weight updates) run in the same thread between iterations, so they never race a forward pass.
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
from megatron_bpd.serve.sampling import SamplingRow, SlotSampling

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
    slot: int = -1  # the KV-cache slot while running
    stop_ids: frozenset[int] = frozenset()  # stop_token_ids, plus EOS unless ignore_eos

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


class Engine:
    """Thread-safe front: ``submit``, ``abort``, ``call``; everything else runs in the engine thread."""

    def __init__(self, load: Callable[[], tuple[torch.nn.Module, Any]], max_running: int = 64,
                 max_prefill_tokens: int = 16384, compile: bool = False):
        self._load, self._compile = load, compile
        self.max_running, self.max_prefill_tokens = max_running, max_prefill_tokens
        self.loaded = threading.Event()
        self.load_error: BaseException | None = None
        self.model = self.tokenizer = self.runner = None
        self.weight_version = "default"
        self.paused = False
        self.num_finished = 0
        self._commands: queue.Queue = queue.Queue()
        self._waiting: deque[list[Sequence]] = deque()  # groups of samples sharing one prompt
        self._running: list[Sequence] = []  # in slot order
        self._slots: list[Sequence | None] = [None] * max_running
        self._sampling = SlotSampling(max_running)
        self._cache: KVCache | None = None
        self._next_logits: torch.Tensor | None = None  # [len(_running), V]
        self._stop_ids: frozenset[int] = frozenset()
        self._set_running([], None)
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
            self.runner = Qwen3Runner(self.model, compile=self._compile)
            self._cache = self.runner.new_cache(self.max_running)
            eos = self.model.config.eos_token_id
            self._stop_ids = frozenset([] if eos is None else ([eos] if isinstance(eos, int) else eos))
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
                if self._waiting and None in self._slots:
                    self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine iteration failed")
                self._abort(None, f"internal error: {type(exc).__name__}: {exc}", status_code=500)
                self._slots = [None] * self.max_running
                self._set_running([], None)

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
        """Prefill waiting samples in one batch, up to the free slots and ``max_prefill_tokens`` prompt tokens, each
        distinct prompt once (the n samples of a prompt, and equal prompts of different requests, share a prefill).
        A group wider than the free slots is split; samples leave the queue only once the prefill succeeded."""
        free = [slot for slot, seq in enumerate(self._slots) if seq is None]
        groups, tokens = [], 0
        for group in self._waiting:
            taken = sum(map(len, groups))
            if taken == len(free) or (groups and tokens + len(group[0].prompt) > self.max_prefill_tokens):
                break
            groups.append(group[: len(free) - taken])
            tokens += len(group[0].prompt)
        prompts: dict[tuple[int, ...], int] = {}  # prompt -> its row in the prefill batch
        rows = [prompts.setdefault(tuple(g[0].prompt), len(prompts)) for g in groups]
        for seq, slot in zip((seq for g in groups for seq in g), free):
            seq.slot = slot
        owner = {}  # prefill row -> the slot it is computed in
        for g, row in zip(groups, rows):
            owner.setdefault(row, g[0].slot)
        lens = torch.tensor([len(p) for p in prompts])
        batch = torch.zeros(len(prompts), int(lens.max()), dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            batch[row, : len(prompt)] = torch.tensor(prompt)
        scored = [(g, row) for g, row in zip(groups, rows) if g[0].wants_input_logprobs]
        spans = [torch.arange(g[0].logprob_start_len, len(g[0].prompt) - 1) for g, _ in scored]
        n_scored = sum(map(len, spans))
        at_rows = torch.cat([torch.full_like(c, row) for c, (_, row) in zip(spans, scored)] + [torch.arange(len(lens))])
        at_cols = torch.cat(spans + [lens - 1])
        logits = self.runner.forward(self._cache, [owner[row] for row in range(len(prompts))], batch, lens,
                                     at=(at_rows, at_cols))
        if scored:
            targets = batch[at_rows[:n_scored], at_cols[:n_scored] + 1]
            per_group = input_logprobs(logits[:n_scored], targets, [len(c) for c in spans],
                                       [g[0].top_logprobs_num for g, _ in scored])
            for (g, _), (values, tops) in zip(scored, per_group):
                for seq in g:
                    seq.input_logprobs, seq.input_top = values, tops
        joined, last_rows, prefilled = [], [], []
        for g, row in zip(groups, rows):
            if g[0].params.max_new_tokens == 0:
                prefilled += g
                continue
            others = [seq.slot for seq in g if seq.slot != owner[row]]
            self._cache.copy([owner[row]] * len(others), others)
            for seq in g:
                self._slots[seq.slot] = seq
                self._sampling.assign(seq.slot, seq.sampling, seq.params.max_new_tokens)
                seq.stop_ids = frozenset(seq.params.stop_token_ids or ()) | (
                    frozenset() if seq.params.ignore_eos else self._stop_ids)
            joined += g
            last_rows += [n_scored + row] * len(g)
        if joined:
            self._join(joined, logits[torch.tensor(last_rows)])
        for g in groups:  # admitted: they leave the queue (an error before this aborts them there)
            if len(g) < len(self._waiting[0]):
                self._waiting[0] = self._waiting[0][len(g):]
            else:
                self._waiting.popleft()
        for seq in prefilled:
            self._finish(seq, {"type": "length", "length": 0})

    def _join(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Add running ``seqs`` (next-token logits [n, V])."""
        self._set_running(self._running + seqs,
                          logits if self._next_logits is None else torch.cat([self._next_logits, logits]))

    def _set_running(self, running: list[Sequence], logits: torch.Tensor | None) -> None:
        """Make ``running`` (next-token logits [len(running), V], row b is running[b]) the running batch, in slots
        0..B-1 and in slot order: the sequences in slots >= B move into the free slots below B."""
        holes = [slot for slot in range(len(running)) if self._slots[slot] is None]
        movers = [seq for seq in running if seq.slot >= len(running)]
        if holes:
            self._cache.copy([seq.slot for seq in movers], holes)
            self._sampling.copy([seq.slot for seq in movers], holes)
            for seq, slot in zip(movers, holes):
                self._slots[seq.slot], self._slots[slot], seq.slot = None, seq, slot
        order = sorted(range(len(running)), key=lambda b: running[b].slot)
        if order != list(range(len(running))):
            running, logits = [running[b] for b in order], logits[torch.tensor(order)]
        self._running, self._next_logits = running, logits
        self._logprob_rows = any(seq.return_logprob for seq in running)
        self._top_k = max((seq.top_logprobs_num for seq in running if seq.return_logprob), default=0)

    def _step(self) -> None:
        """Sample one token for every running row, retire the finished ones, run one decode step for the rest."""
        tokens, logprobs = self._sampling.sample(self._next_logits, torch.arange(len(self._running)))
        token_list = tokens.tolist()
        if self._logprob_rows:
            chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            if self._top_k:
                top_values, top_ids = torch.topk(logprobs, min(self._top_k, logprobs.shape[1]))
                top_values, top_ids = top_values.tolist(), top_ids.tolist()
        keep = []
        for b, (seq, token) in enumerate(zip(self._running, token_list)):
            seq.output_ids.append(token)
            if seq.return_logprob:
                seq.output_logprobs.append(chosen[b])
                if seq.top_logprobs_num > 0:
                    k = seq.top_logprobs_num
                    seq.output_top.append((top_values[b][:k], top_ids[b][:k]))
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(seq, reason)
            else:
                keep.append(b)
                if seq.stream:
                    seq.notify(seq, len(seq.output_ids))
        self._retain(keep)
        if self._running:
            step_tokens = torch.tensor([seq.output_ids[-1] for seq in self._running])
            self._next_logits = self.runner.decode(self._cache, step_tokens)

    def _retain(self, keep: list[int]) -> None:
        """Keep running rows ``keep`` (indices into the current batch, ascending); the others' slots become free."""
        if len(keep) == len(self._running):
            return
        for b in set(range(len(self._running))) - set(keep):
            self._slots[self._running[b].slot] = None
        self._set_running([self._running[b] for b in keep],
                          self._next_logits[torch.tensor(keep)] if keep else None)

    def _finish_reason(self, seq: Sequence, token: int) -> dict[str, Any] | None:
        p = seq.params
        if token in seq.stop_ids:
            return {"type": "stop", "matched": token}
        if p.stop:
            tail = seq.output_ids[-self._stop_tail(p.stop):]
            text = self.tokenizer.decode(tail, skip_special_tokens=p.skip_special_tokens)
            for s in p.stop:
                if s in text:
                    return {"type": "stop", "matched": s}
        if len(seq.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        return None

    @staticmethod
    def _stop_tail(stops: list[str]) -> int:
        """Output tokens to decode for a stop-string check: a new match ends in the last token and spans at most
        one token per UTF-8 byte (plus skipped special tokens: a margin)."""
        return max(len(s.encode()) for s in stops) + 8

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


def input_logprobs(logits: torch.Tensor, targets: torch.Tensor, counts: list[int], ks: list[int]):
    """SGLang's input log-probs of several prompts from one batch of scored positions.

    Group g owns ``counts[g]`` consecutive rows of ``logits`` [N, V] (the positions start..L-2 of its prompt, each
    predicting the next prompt token ``targets`` [N]). Returns per group (values, tops): values[0] = None, then
    log_softmax(logits[p])[targets[p]] (temperature 1); tops = [None] + the ``ks[g]`` largest (log-probs, ids) of
    each row when ks[g] > 0, else []."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    k = min(max(ks), logprobs.shape[1])
    top_values, top_ids = torch.topk(logprobs, k) if k > 0 else (logprobs[:, :0], logprobs[:, :0])
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out, begin = [], 0
    for count, k in zip(counts, ks):
        rows = range(begin, begin + count)
        tops = [None] + [(top_values[r][:k], top_ids[r][:k]) for r in rows] if k > 0 else []
        out.append(([None] + values[begin : begin + count], tops))
        begin += count
    return out
