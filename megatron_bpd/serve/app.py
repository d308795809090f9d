"""aiohttp application speaking SGLang's native HTTP protocol in front of an Engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import fields
from typing import Any

import torch
from aiohttp import web

from megatron_bpd.rollout.protocol import SGLANG_SAMPLING_KEYS, ProtocolError, SamplingParams
from megatron_bpd.serve.engine import Engine, Sequence
from megatron_bpd.serve.sampling import SamplingRow
from megatron_bpd.rollout.weight_sync import init_custom_process_group
from megatron_bpd.serve.weights import load_named_tensors, receive_weights, update_weights_from_disk

log = logging.getLogger(__name__)
VERSION = "megatron-bpd-serve/0.1 (SGLang 0.5 native protocol)"
# SGLang keys the embedded server accepts only at their defaults (it has no penalties, grammars, ...).
_DEFAULT_ONLY = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
                 "min_new_tokens": 0, "stop_regex": None, "json_schema": None, "regex": None, "ebnf": None,
                 "structural_tag": None, "logit_bias": {}, "custom_params": None, "beam_width": None,
                 "watermark": None, "choice": []}
_IGNORED = {"spaces_between_special_tokens", "stream_interval"}
_OURS = {f.name for f in fields(SamplingParams)}


def parse_sampling_params(raw: Any) -> SamplingParams:
    """SGLang's sampling_params JSON -> SamplingParams; unknown keys are an error (HTTP 400), as in SGLang."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ProtocolError(f"sampling_params must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SGLANG_SAMPLING_KEYS)
    if unknown:
        raise ProtocolError(f"Unknown sampling_params keys {unknown}")
    for key, default in _DEFAULT_ONLY.items():
        if raw.get(key, default) not in (default, None):
            raise ProtocolError(f"sampling_params.{key}={raw[key]!r} is not supported by the embedded server")
    params = {k: v for k, v in raw.items() if k in _OURS and v is not None}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    if params.get("top_k", -1) >= 1 << 30:  # SGLang's "no top-k" default
        params["top_k"] = -1
    try:
        return SamplingParams(**params)
    except TypeError as exc:
        raise ProtocolError(f"bad sampling_params: {exc}") from exc


def _per_prompt(value: Any, count: int, name: str, batched: bool) -> list:
    if batched and isinstance(value, list):
        if len(value) != count:
            raise ProtocolError(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def api_key_middleware(api_key: str):
    """SGLang's ``--api-key`` check: every request but OPTIONS, /health* and /metrics* needs the header
    ``Authorization: Bearer <api_key>``, else HTTP 401 ``{"error": "Unauthorized"}``."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def authenticate(request: web.Request, handler):
        if request.method == "OPTIONS" or request.path.startswith(("/health", "/metrics")) or \
                hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return await handler(request)
        return web.json_response({"error": "Unauthorized"}, status=401)
    return authenticate


class SGLangServer:
    """The HTTP endpoints. ``model_path`` is reported by /model_info and /server_info; with ``api_key`` requests
    must carry it as SGLang's do (see ``api_key_middleware``)."""

    def __init__(self, engine: Engine, model_path: str, host: str, port: int, seed: int = 0,
                 api_key: str | None = None):
        self.engine, self.model_path, self.host, self.port = engine, model_path, host, port
        self._seeds = random.Random(seed)
        self._update_groups: dict[str, Any] = {}
        self._update_session = False
        self.app = web.Application(client_max_size=1 << 30,
                                   middlewares=[api_key_middleware(api_key)] if api_key else [])
        get, post = self.app.router.add_get, self.app.router.add_post
        for path in ("/health", "/health_generate"):
            get(path, self.health)
        for path in ("/model_info", "/get_model_info"):
            get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            get(path, self.server_info)
        get("/get_weight_version", self.get_weight_version)
        post("/generate", self.generate)
        for path, handler in (("/flush_cache", self.flush_cache), ("/abort_request", self.abort_request),
                              ("/pause_generation", self.pause_generation),
                              ("/continue_generation", self.continue_generation),
                              ("/update_weights_from_disk", self.update_weights_from_disk),
                              ("/init_weights_update_group", self.init_weights_update_group),
                              ("/begin_weight_update", self.begin_weight_update),
                              ("/update_weights_from_distributed", self.update_weights_from_distributed),
                              ("/end_weight_update", self.end_weight_update)):
            post(path, handler)
        self.app.router.add_get("/flush_cache", self.flush_cache)

    # ---- status ----
    async def health(self, request: web.Request) -> web.Response:
        if self.engine.load_error is not None:
            return web.Response(status=500, text=f"model failed to load: {self.engine.load_error}")
        return web.Response(status=200 if self.engine.loaded.is_set() else 503)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.model_path, "served_model_name": self.model_path,
                                  "tokenizer_path": self.model_path, "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": self.engine.weight_version})

    async def server_info(self, request: web.Request) -> web.Response:
        config = self.engine.model.config if self.engine.model is not None else None
        return web.json_response({
            "model_path": self.model_path, "served_model_name": self.model_path, "tokenizer_path": self.model_path,
            "max_context_length": getattr(config, "max_position_embeddings", 0), "version": VERSION,
            "internal_states": [{"num_requests": self.engine.num_requests, "num_finished": self.engine.num_finished,
                                 "paused": self.engine.paused}],
            "host": self.host, "port": self.port, "disaggregation_mode": "null", "dp_size": 1, "tp_size": 1,
            "weight_version": self.engine.weight_version})

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.engine.weight_version})

    # ---- generation ----
    async def generate(self, request: web.Request) -> web.StreamResponse:
        if not self.engine.loaded.is_set():
            return _error(503, "the model is still loading")
        try:
            body = await request.json()
            groups, batched = self._parse_generate(body)
        except (ProtocolError, ValueError) as exc:
            return _error(400, str(exc))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = [seq for group in groups for seq in group]
        for index, seq in enumerate(seqs):
            seq.notify = lambda s, n, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, n, s.finish))
        self.engine.submit(groups)
        try:
            if body.get("stream"):
                return await self._stream(request, seqs, events)
            pending = len(seqs)
            while pending:
                _, _, finish = await events.get()
                pending -= finish is not None
        except asyncio.CancelledError:  # the client went away
            for rid in {seq.request_rid for seq in seqs}:
                self.engine.abort(rid, "client disconnected")
            raise
        outputs = [self._format(seq, len(seq.output_ids), seq.finish) for seq in seqs]
        return web.json_response(outputs if batched or len(outputs) > 1 else outputs[0])

    async def _stream(self, request: web.Request, seqs: list[Sequence], events: asyncio.Queue):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        pending = len(seqs)
        while pending:
            index, n, finish = await events.get()
            pending -= finish is not None
            chunk = self._format(seqs[index], n, finish) | {"index": index}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _parse_generate(self, body: Any) -> tuple[list[list[Sequence]], bool]:
        """The request JSON -> (groups of Sequences, one group of n samples per prompt; whether it is a batch)."""
        if not isinstance(body, dict):
            raise ProtocolError("the /generate body must be a JSON object")
        tokenizer = self.engine.tokenizer
        if body.get("input_ids") is not None:
            ids = body["input_ids"]
            batched = bool(ids) and isinstance(ids[0], list)
            prompts = ids if batched else [ids]
        elif body.get("text") is not None:
            if tokenizer is None:
                raise ProtocolError("`text` needs a tokenizer in the model folder; send input_ids")
            batched = isinstance(body["text"], list)
            prompts = [tokenizer.encode(t) for t in (body["text"] if batched else [body["text"]])]
        else:
            raise ProtocolError("/generate needs input_ids or text")
        count = len(prompts)
        rids = _per_prompt(body.get("rid") or uuid.uuid4().hex, count, "rid", batched)
        if batched and not isinstance(body.get("rid"), list):
            rids = [f"{r}-{i}" for i, r in enumerate(rids)]
        params = [parse_sampling_params(p) for p in _per_prompt(body.get("sampling_params"), count,
                                                                "sampling_params", batched)]
        return_logprob = _per_prompt(body.get("return_logprob") or False, count, "return_logprob", batched)
        start = _per_prompt(body.get("logprob_start_len", -1), count, "logprob_start_len", batched)
        top_num = _per_prompt(body.get("top_logprobs_num") or 0, count, "top_logprobs_num", batched)
        config = self.engine.model.config
        groups = []
        for i, prompt in enumerate(prompts):
            if not prompt or not all(isinstance(t, int) and 0 <= t < config.vocab_size for t in prompt):
                raise ProtocolError(f"prompt {i}: input_ids must be a non-empty list of ids in "
                                    f"[0, {config.vocab_size})")
            if len(prompt) + params[i].max_new_tokens > config.max_position_embeddings:
                raise ProtocolError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens {params[i].max_new_tokens} "
                                    f"exceed the context length {config.max_position_embeddings}")
            if start[i] is None:
                start[i] = -1
            if not -1 <= start[i] < len(prompt):
                raise ProtocolError(f"prompt {i}: logprob_start_len {start[i]} not in [-1, {len(prompt)})")
            if params[i].stop and tokenizer is None:
                raise ProtocolError("stop strings need a tokenizer in the model folder; use stop_token_ids")
            group = []
            for j in range(params[i].n):
                seed = params[i].sampling_seed
                seed = self._seeds.getrandbits(63) if seed is None else seed + j
                p = params[i]
                group.append(Sequence(
                    rid=rids[i] if p.n == 1 else f"{rids[i]}-{j}", request_rid=rids[i], prompt=list(prompt), params=p,
                    sampling=SamplingRow(p.temperature, p.top_p, p.top_k, torch.Generator().manual_seed(seed)),
                    notify=lambda s, n: None, stream=bool(body.get("stream")), return_logprob=bool(return_logprob[i]),
                    logprob_start_len=start[i], top_logprobs_num=int(top_num[i])))
            groups.append(group)
        return groups, batched

    def _format(self, seq: Sequence, n: int, finish: dict[str, Any] | None) -> dict[str, Any]:
        """SGLang's response object for ``seq`` after its first ``n`` output tokens (``finish``: its finish reason
        then, None while running); safe while the engine thread appends further tokens."""
        tokenizer, p = self.engine.tokenizer, seq.params
        ids = seq.output_ids[:n]
        text = tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens) if tokenizer else ""
        matched = (finish or {}).get("matched")
        if isinstance(matched, str) and not p.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
        piece = (lambda t: tokenizer.decode([t])) if tokenizer else (lambda t: None)
        triples = lambda lps, toks: [[lp, t, piece(t)] for lp, t in zip(lps, toks)]  # noqa: E731
        meta = {"id": seq.rid, "finish_reason": finish, "prompt_tokens": len(seq.prompt),
                "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": seq.weight_version,
                "e2e_latency": time.monotonic() - seq.created}
        if seq.return_logprob:
            meta["output_token_logprobs"] = triples(seq.output_logprobs[:n], ids)
            scored = seq.prompt[len(seq.prompt) - len(seq.input_logprobs):]  # positions logprob_start_len..L-1
            meta["input_token_logprobs"] = triples(seq.input_logprobs, scored)
            if seq.top_logprobs_num > 0:
                meta["output_top_logprobs"] = [triples(*row) for row in seq.output_top[:n]]
                meta["input_top_logprobs"] = [None if row is None else triples(*row) for row in seq.input_top]
        return {"text": text, "output_ids": ids, "meta_info": meta}

    # ---- control ----
    async def flush_cache(self, request: web.Request) -> web.Response:
        busy = await asyncio.wrap_future(self.engine.call(lambda e: e.num_requests > 0 and not e.paused))
        if busy:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.")
        return web.Response(text="Cache flushed.")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        self.engine.abort(None if body.get("abort_all") else body.get("rid", ""), "Aborted by /abort_request")
        return web.json_response({"success": True})

    async def pause_generation(self, request: web.Request) -> web.Response:
        """mode "abort" (default) aborts every request; "in_place" / "retract" keep them (retract is in_place here)."""
        mode = (await _json_body(request)).get("mode", "abort")
        if mode not in ("abort", "in_place", "retract"):
            return _error(400, f"unknown pause mode {mode!r}")

        def pause(engine: Engine):
            if mode == "abort":
                engine._abort(None, "Aborted by /pause_generation")
            engine.paused = True
        await asyncio.wrap_future(self.engine.call(pause))
        return web.json_response({"success": True, "message": "Generation paused."})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await asyncio.wrap_future(self.engine.call(lambda e: setattr(e, "paused", False)))
        return web.json_response({"success": True, "message": "Generation continued."})

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not body.get("model_path"):
            return _error(400, "update_weights_from_disk needs model_path")

        def update(engine: Engine):
            if body.get("abort_all_requests"):
                engine._abort(None, "Aborted for a weight update")
            count = update_weights_from_disk(engine.model, body["model_path"])
            if body.get("weight_version") is not None:
                engine.weight_version = str(body["weight_version"])
            return count
        try:
            count = await asyncio.wrap_future(self.engine.call(update))
        except (OSError, KeyError, ValueError) as exc:
            return web.json_response({"success": False, "message": str(exc), "num_paused_requests": 0}, status=400)
        return web.json_response({"success": True, "num_paused_requests": 0,
                                  "message": f"Loaded {count} tensors from {body['model_path']}; weight_version "
                                             f"{self.engine.weight_version}"})


    # ---- distributed weight updates (gloo on CPU; the same calls as SGLang's NCCL path) ----
    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            name = body.get("group_name", "weight_update_group")
            self._update_groups[name] = await asyncio.to_thread(
                init_custom_process_group, body.get("backend", "nccl"),
                f"tcp://{body['master_address']}:{body['master_port']}", body["world_size"], body["rank_offset"], name)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as SGLang does
            return web.json_response({"success": False, "message": f"Failed to init group: {exc}"}, status=400)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        if self._update_session:
            return web.json_response({"success": False, "message": "a weight-update session is already open"})
        self._update_session = True
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        ok, self._update_session = self._update_session, False
        return web.json_response({"success": ok, "message": "Success" if ok else "no weight-update session is open"})

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        group = self._update_groups.get(body.get("group_name", "weight_update_group"))
        if group is None or not self._update_session:
            message = "no such update group" if group is None else "call /begin_weight_update first"
            return web.json_response({"success": False, "message": message}, status=400)
        try:
            tensors = await asyncio.to_thread(receive_weights, group, body["names"], body["dtypes"], body["shapes"])

            def load(engine: Engine):
                count = load_named_tensors(engine.model, tensors, "update_weights_from_distributed")
                if body.get("weight_version") is not None:
                    engine.weight_version = str(body["weight_version"])
                return count
            count = await asyncio.wrap_future(self.engine.call(load))
        except (KeyError, ValueError, RuntimeError) as exc:
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        return web.json_response({"success": True, "message": f"Succeeded to update {count} parameters online."})

async def _json_body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    body = await request.json()
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the request body must be a JSON object")
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)

