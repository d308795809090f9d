"""Async HTTP client for SGLang's native API (real SGLang servers, an sglang-router, or ``megatron_bpd.serve``).

Requests go round robin over ``urls`` with bounded concurrency. Connection errors, timeouts and HTTP 5xx are
retried with exponential backoff on the next server (a server that failed is skipped for ``cooldown_s``); HTTP 4xx
and malformed responses raise at once. Control calls (pause, flush, weight updates) go to every ``control_urls``
server: the workers themselves, also when generation goes through a router. Servers started with ``--api-key`` get
it on every request as ``Authorization: Bearer <key>`` (``ClientConfig.api_key``, else $SGLANG_API_KEY).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import aiohttp

from megatron_bpd.rollout.protocol import GenerateOutput, GenerateRequest, ProtocolError

log = logging.getLogger(__name__)
API_KEY_ENV = "SGLANG_API_KEY"


class ServerError(RuntimeError):
    """A server answered with an error status that retrying cannot fix, or every retry failed."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Retryable(Exception):
    pass


@dataclass
class ClientConfig:
    urls: Sequence[str]
    control_urls: Sequence[str] | None = None  # default: urls
    max_concurrency: int = 64
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    cooldown_s: float = 5.0
    health_timeout_s: float = 300.0
    rid_prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    api_key: str | None = None  # None: $SGLANG_API_KEY if set

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if not self.urls:
            raise ValueError("ClientConfig.urls is empty: give at least one server or router URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.control_urls = [u.rstrip("/") for u in (self.control_urls or self.urls)]


async def gather_all(coros) -> list:
    """Like asyncio.gather, but the first failure cancels the other coroutines before it is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        raise failed[0].exception()
    return [t.result() for t in tasks]


class SGLangClient:
    """Use as ``async with SGLangClient(config) as client: ...``."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._cursor = 0
        self._down_until = {u: 0.0 for u in config.urls}
        self._counter = 0

    async def __aenter__(self) -> "SGLangClient":
        connector = aiohttp.TCPConnector(limit=self.config.max_concurrency * 2)
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else None
        self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def new_rid(self, tag: str = "") -> str:
        self._counter += 1
        return f"{self.config.rid_prefix}-{tag}{self._counter}"

    async def wait_healthy(self, urls: Sequence[str] | None = None) -> None:
        """Poll ``GET /health`` on every server until all answer 200, up to ``health_timeout_s``."""
        deadline = time.monotonic() + self.config.health_timeout_s
        for url in urls or sorted(set(self.config.urls) | set(self.config.control_urls)):
            while True:
                try:
                    async with self._http.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}/health not ready after {self.config.health_timeout_s} s")
                await asyncio.sleep(0.2)

    async def generate(self, request: GenerateRequest) -> list[GenerateOutput]:
        """POST /generate; returns the request's ``sampling_params.n`` samples. Each attempt picks its server when
        it gets a concurrency slot and sends a fresh rid (``<rid>.<attempt>``)."""
        base_rid = request.rid or self.new_rid()
        for attempt in range(self.config.max_retries + 1):
            payload = request.to_json() | {"rid": f"{base_rid}.{attempt}", "stream": False}
            async with self._semaphore:
                url = self._pick()
                try:
                    body = await self._post_json(url, "/generate", payload, self.config.request_timeout_s, True)
                    break
                except _Retryable as exc:
                    self._down_until[url] = time.monotonic() + self.config.cooldown_s
                    failure = exc
            if attempt == self.config.max_retries:
                raise ServerError(f"/generate rid={base_rid} failed after {attempt + 1} attempts: "
                                  f"{failure}") from failure
            delay = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** attempt)
            log.warning("retrying rid=%s in %.2f s after %s", base_rid, delay, failure)
            await asyncio.sleep(delay)
        items = body if isinstance(body, list) else [body]
        if len(items) != request.sampling_params.n:
            raise ProtocolError(f"/generate rid={base_rid}: expected {request.sampling_params.n} samples, "
                                f"got {len(items)}")
        return [GenerateOutput.from_json(item) for item in items]

    async def post(self, url: str, path: str, payload: dict | None = None, timeout_s: float = 600.0) -> Any:
        """POST one control request to one server (no retries); returns the decoded JSON or text body."""
        try:
            return await self._post_json(url, path, payload or {}, timeout_s)
        except _Retryable as exc:
            raise ServerError(f"{url}{path} failed: {exc}") from exc

    async def post_all(self, path: str, payload: dict | None = None, timeout_s: float = 600.0) -> list[Any]:
        """POST the same control request to every control server concurrently."""
        return list(await asyncio.gather(*(self.post(u, path, payload, timeout_s) for u in self.config.control_urls)))

    async def get(self, url: str, path: str) -> Any:
        async with self._http.get(f"{url}{path}", timeout=aiohttp.ClientTimeout(total=60)) as resp:
            return await self._decode(url, path, resp)

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SGLangClient is not open: use `async with SGLangClient(config) as client`")
        return self._session

    def _pick(self) -> str:
        """Next server round robin, skipping servers in cool-down unless all are."""
        urls, now = self.config.urls, time.monotonic()
        for _ in range(len(urls)):
            url = urls[self._cursor % len(urls)]
            self._cursor += 1
            if self._down_until[url] <= now:
                return url
        url = urls[self._cursor % len(urls)]
        self._cursor += 1
        return url

    async def _post_json(self, url: str, path: str, payload: dict, timeout_s: float, expect_json: bool = False) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.config.connect_timeout_s)
        try:
            async with self._http.post(f"{url}{path}", json=payload, timeout=timeout) as resp:
                return await self._decode(url, path, resp, expect_json)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            raise _Retryable(f"{url}{path}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    async def _decode(url: str, path: str, resp: aiohttp.ClientResponse, expect_json: bool = False) -> Any:
        text = await resp.text()
        if resp.status >= 500:
            raise _Retryable(f"{url}{path}: HTTP {resp.status}: {text[:300]}")
        if resp.status >= 400:
            raise ServerError(f"{url}{path}: HTTP {resp.status}: {text[:300]}", resp.status)
        if not expect_json and "json" not in (resp.content_type or ""):
            return text
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ProtocolError(f"{url}{path}: malformed JSON in response ({exc}): {text[:200]!r}") from exc
