"""SGLang native-protocol types (``/generate`` request and response) shared by the client and the embedded server.

The JSON layout follows SGLang 0.5.x (``sglang/api/v1/api_types.py``): log-probs travel as ``[logprob, token_id,
text]`` triples, ``input_token_logprobs`` starts with a ``null`` log-prob at ``logprob_start_len`` and the finish
reason is ``{"type": "stop" | "length" | "abort", ...}``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Every key SGLang 0.5.23's SamplingParams accepts; anything else is rejected with HTTP 400, as SGLang does.
SGLANG_SAMPLING_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
})
FINISH_REASONS = ("stop", "length", "abort")


class ProtocolError(ValueError):
    """A request or response that breaks the SGLang contract (bad keys, missing fields, misaligned log-probs)."""


@dataclass
class SamplingParams:
    """The subset of SGLang's ``sampling_params`` this project uses. ``top_k = -1`` and ``top_p = 1`` disable the
    filters; ``temperature = 0`` is greedy (SGLang then reports log-probs at temperature 1)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    sampling_seed: int | None = None
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ProtocolError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ProtocolError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ProtocolError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ProtocolError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ProtocolError(f"n must be >= 1, got {self.n}")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class GenerateRequest:
    """One ``/generate`` request for one prompt (``input_ids``)."""

    input_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    rid: str | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False

    def to_json(self) -> dict[str, Any]:
        body = {"input_ids": list(self.input_ids), "sampling_params": self.sampling_params.to_json(),
                "return_logprob": self.return_logprob, "logprob_start_len": self.logprob_start_len,
                "top_logprobs_num": self.top_logprobs_num, "return_text_in_logprobs": self.return_text_in_logprobs,
                "stream": self.stream}
        if self.rid is not None:
            body["rid"] = self.rid
        return body


@dataclass
class TokenLogprobs:
    """A parsed list of ``[logprob, token_id, text]`` triples; ``logprobs[i]`` is None where SGLang sends null."""

    logprobs: list[float | None]
    token_ids: list[int]


@dataclass
class GenerateOutput:
    """One sample of a ``/generate`` response. Log-prob fields are None unless ``return_logprob`` was set."""

    rid: str
    output_ids: list[int]
    text: str
    finish_reason: str
    finish_detail: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | None
    output_token_logprobs: TokenLogprobs | None = None
    output_top_logprobs: list[TokenLogprobs | None] | None = None
    input_token_logprobs: TokenLogprobs | None = None
    input_top_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def from_json(cls, obj: Any) -> "GenerateOutput":
        """Parse one response object; raise ProtocolError naming the first field that breaks the contract."""
        if not isinstance(obj, dict):
            raise ProtocolError(f"/generate response must be a JSON object, got {type(obj).__name__}")
        meta = _get(obj, "meta_info", dict, "response")
        rid = str(meta.get("id", ""))
        where = f"response {rid!r}"
        output_ids = _int_list(_get(obj, "output_ids", list, where), f"{where} output_ids")
        finish = meta.get("finish_reason")
        if not isinstance(finish, dict) or finish.get("type") not in FINISH_REASONS:
            raise ProtocolError(f"{where}: finish_reason must be an object with type in {FINISH_REASONS}, "
                                f"got {finish!r}")
        out = cls(
            rid=rid, output_ids=output_ids, text=obj.get("text") or "", finish_reason=finish["type"],
            finish_detail=finish, prompt_tokens=_get(meta, "prompt_tokens", int, where),
            completion_tokens=_get(meta, "completion_tokens", int, where),
            weight_version=None if meta.get("weight_version") is None else str(meta["weight_version"]),
        )
        if out.completion_tokens != len(output_ids):
            raise ProtocolError(f"{where}: completion_tokens={out.completion_tokens} but {len(output_ids)} output_ids")
        if meta.get("output_token_logprobs") is not None:
            out.output_token_logprobs = parse_logprob_entries(meta["output_token_logprobs"],
                                                              f"{where} output_token_logprobs")
        if meta.get("input_token_logprobs") is not None:
            out.input_token_logprobs = parse_logprob_entries(meta["input_token_logprobs"],
                                                             f"{where} input_token_logprobs")
        for key in ("output_top_logprobs", "input_top_logprobs"):
            rows = meta.get(key)
            if rows is not None:
                if not isinstance(rows, list):
                    raise ProtocolError(f"{where}: {key} must be a list, got {type(rows).__name__}")
                setattr(out, key, [None if row is None else parse_logprob_entries(row, f"{where} {key}[{i}]")
                                   for i, row in enumerate(rows)])
        return out


def parse_logprob_entries(entries: Any, where: str) -> TokenLogprobs:
    """Parse ``[[logprob | null, token_id, text | null], ...]``."""
    if not isinstance(entries, list):
        raise ProtocolError(f"{where}: expected a list of [logprob, token_id, text], got {type(entries).__name__}")
    logprobs, token_ids = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise ProtocolError(f"{where}[{i}]: expected [logprob, token_id, text], got {entry!r}")
        lp, tok = entry[0], entry[1]
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, (int, float))):
            raise ProtocolError(f"{where}[{i}]: log-prob must be a number or null, got {lp!r}")
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise ProtocolError(f"{where}[{i}]: token id must be an integer, got {tok!r}")
        logprobs.append(None if lp is None else float(lp))
        token_ids.append(tok)
    return TokenLogprobs(logprobs, token_ids)


def check_logprobs(logprobs: list[float | None], where: str) -> None:
    """Raise ProtocolError unless every log-prob is a finite number <= 0 (a tolerance of 1e-4 for rounding)."""
    for i, lp in enumerate(logprobs):
        if lp is None or not math.isfinite(lp) or lp > 1e-4:
            raise ProtocolError(f"{where}[{i}]: log-prob {lp!r} is not a finite number <= 0")


def _get(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r:.80}")
    return value


def _int_list(values: list, where: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProtocolError(f"{where}: expected a list of integers")
    return values
