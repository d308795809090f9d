r"""Answer checking with math-verify: the last ``\boxed{...}`` of a response against a reference answer.

``is_correct(response, gold)`` is the function the evaluation and the trainer's solve rate use; ``check`` returns the
full verdict (the extracted answer and why it failed) and ``check_batch`` / ``is_correct_batch`` score many
responses, parsing each distinct gold answer once.

How a response is scored:

1. Extraction: the argument of the *last* ``\boxed{...}`` (or ``\fbox{...}``, or ``\boxed 5``) in the response,
   with nested braces matched. No box -> incorrect (status ``no_boxed``). Answers outside a box are not looked for:
   the prompt asks for a box, and guessing "the last number" rewards unfinished responses.
2. Parsing: both the gold answer and the extracted answer are parsed by ``math_verify.parse`` (LaTeX first, then
   plain expressions). math-verify falls back to the raw string when LaTeX parsing fails, so two identical
   unparseable strings (e.g. ``\text{Evelyn}``) still match by string comparison. An empty parse is reported
   (``gold_parse_error`` / ``pred_parse_error``) and counts as incorrect.
3. Verification: ``math_verify.verify(gold, prediction)`` (numeric, symbolic, set/interval and relation equality).

Robustness: every exception, and math-verify's ``TimeoutException`` (a ``BaseException``), is caught; the sample
counts as incorrect with status ``timeout`` or ``error``. math-verify's time limits use ``signal.alarm``, which only
works in the main thread: off the main thread this module runs math-verify without its time limits (call it from
the main thread, or from worker *processes*, when untrusted answers may make sympy slow).

Checked against the shipped data (tests/test_eval.py, math-verify 0.9.0): every gold answer of the four benchmarks,
boxed, is scored correct against itself, and integer answers plus one are scored wrong. Of the reference solutions
(MATH500, AIME24), all but one verify through their last box; ``KNOWN_SOLUTION_MISMATCHES`` lists the exception.
Before ``clean_answer`` existed, two more failed: aime24/70 (``\boxed{104.}``) and aime24/75
(``\boxed{\textbf{(073)}}``).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

# Reference solutions whose last \boxed{} is not verified equal to the gold answer: problem id -> why.
KNOWN_SOLUTION_MISMATCHES: dict[str, str] = {
    "aime24/60": "the solution has no \\boxed{} (it ends with '$180 + 24 = 204$')",
}

STATUSES = ("correct", "wrong", "no_boxed", "gold_parse_error", "pred_parse_error", "timeout", "error")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Verdict:
    """``status``: one of STATUSES; ``extracted``: the boxed answer found in the response (None without one)."""

    correct: bool
    status: str
    extracted: str | None = None
    detail: str = ""


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` / ``\fbox{...}`` (braces balanced) or ``\boxed X`` in ``text``."""
    if not text:
        return None
    best = -1
    for cmd in _BOX_COMMANDS:
        best = max(best, text.rfind(cmd))
    while best >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, best))
        i = best + len(cmd)
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                ch = text[j]
                if ch == "\\":  # skip the escaped character (\{, \}, \\)
                    j += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
                j += 1
            # unbalanced (e.g. a truncated response): try the previous box
        elif i < len(text) and text[i] == " ":  # "\boxed 5" form: up to the next whitespace or "$"
            rest = text[i:].lstrip(" ")
            token = rest.split()[0] if rest.split() else ""
            token = token.split("$")[0]
            if token:
                return token
        # not a box argument (e.g. "\boxedtext" or an unclosed brace): look further left
        prev = -1
        for c in _BOX_COMMANDS:
            prev = max(prev, text.rfind(c, 0, best))
        best = prev
    return None


def clean_answer(answer: str) -> str:
    r"""Light clean-up of an extracted answer that math-verify does not do: a trailing period ("104.") and a
    ``\textbf{...}`` / ``\mathbf{...}`` wrapping the whole answer (``\textbf{(073)}``)."""
    answer = answer.strip()
    while answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    for cmd in ("\\textbf{", "\\mathbf{"):
        if answer.startswith(cmd) and answer.endswith("}") and last_boxed("\\boxed" + answer[len(cmd) - 1:]) == \
                answer[len(cmd):-1].strip():
            answer = answer[len(cmd):-1].strip()
    return answer


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _timeout(seconds: int | None) -> int | None:
    return seconds if seconds and _in_main_thread() else None


def _parse(latex: str, timeout_s: int | None):
    """math-verify parse of a boxed answer: returns (parsed list, error status or None, detail)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify.errors import TimeoutException

    try:
        parsed = parse("\\boxed{" + latex + "}", extraction_config=(LatexExtractionConfig(boxed_match_priority=0),
                                                                    ExprExtractionConfig()),
                       parsing_timeout=_timeout(timeout_s), raise_on_error=True)
    except TimeoutException:
        return [], "timeout", f"parsing {latex[:200]!r} timed out"
    except Exception as exc:  # noqa: BLE001 -- any parser failure is a scored failure, not a crash
        return [], "error", f"parsing {latex[:200]!r}: {type(exc).__name__}: {str(exc)[:200]}"
    if not parsed:
        return [], "empty", f"nothing parsed from {latex[:200]!r}"
    return parsed, None, ""


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str, timeout_s: int | None):
    return _parse(gold, timeout_s)


def parse_gold(gold: str | int | float, timeout_s: int | None = 5):
    """Parse a reference answer (cached); returns (parsed, error status or None, detail)."""
    return _parse_gold_cached(normalize_gold(gold), timeout_s)


def normalize_gold(gold: str | int | float) -> str:
    """Reference answers as LaTeX strings: integral floats lose their ".0" (AMC's 27.0 -> "27")."""
    if isinstance(gold, bool):
        raise TypeError("a gold answer cannot be a bool")
    if isinstance(gold, float):
        return str(int(gold)) if gold.is_integer() else repr(gold)
    if isinstance(gold, int):
        return str(gold)
    text = str(gold).strip()
    inner = last_boxed(text) if text.startswith(_BOX_COMMANDS) else None
    return clean_answer(inner if inner is not None else text)


def check(response: str, gold: str | int | float, timeout_s: int | None = 5) -> Verdict:
    """Score one response against one reference answer; never raises for bad answers (a failure is incorrect)."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    extracted = last_boxed(response or "")
    if extracted is None:
        return Verdict(False, "no_boxed")
    extracted = clean_answer(extracted)
    gold_parsed, err, detail = parse_gold(gold, timeout_s)
    if err is not None:
        return Verdict(False, "gold_parse_error" if err == "empty" else err, extracted, f"gold: {detail}")
    if not extracted:
        return Verdict(False, "pred_parse_error", extracted, "empty box")
    pred_parsed, err, detail = _parse(extracted, timeout_s)
    if err is not None:
        return Verdict(False, "pred_parse_error" if err == "empty" else err, extracted, detail)
    failure = None
    for g in gold_parsed:
        for p in pred_parsed:
            try:
                if verify(g, p, timeout_seconds=_timeout(timeout_s), raise_on_error=True):
                    return Verdict(True, "correct", extracted)
            except TimeoutException:
                failure = failure or ("timeout", "verification timed out")
            except Exception as exc:  # noqa: BLE001
                failure = failure or ("error", f"verify: {type(exc).__name__}: {str(exc)[:200]}")
    if failure is not None:
        return Verdict(False, failure[0], extracted, failure[1])
    return Verdict(False, "wrong", extracted)


def is_correct(response_text: str, gold_answer: str | int | float) -> bool:
    r"""True when the last ``\boxed{}`` of ``response_text`` is mathematically equal to ``gold_answer``."""
    return check(response_text, gold_answer).correct


def check_batch(responses: Sequence[str], golds: Sequence[str | int | float] | str | int | float,
                timeout_s: int | None = 5, workers: int = 0) -> list[Verdict]:
    """``check`` over many responses; ``golds`` is one answer per response, or a single answer for all.

    ``workers > 0`` scores in that many spawned worker processes (each checks in its own main thread, so
    math-verify's time limits apply even when the caller is a worker thread; a crashed worker scores its responses
    as ``error``)."""
    if isinstance(golds, (str, int, float)):
        golds = [golds] * len(responses)
    if len(golds) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    if workers <= 0 or len(responses) <= 1:
        return [check(r, g, timeout_s) for r, g in zip(responses, golds)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunk = max(1, -(-len(responses) // (4 * workers)))
    parts = [(list(responses[i:i + chunk]), list(golds[i:i + chunk]), timeout_s)
             for i in range(0, len(responses), chunk)]
    out: list[Verdict] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_check_part, part) for part in parts]
        for part, fut in zip(parts, futures):
            try:
                out.extend(fut.result())
            except Exception as exc:  # noqa: BLE001 -- e.g. BrokenProcessPool
                out.extend(Verdict(False, "error", last_boxed(r or ""), f"checker process: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}") for r in part[0])
    return out


def _check_part(part) -> list[Verdict]:
    responses, golds, timeout_s = part
    return [check(r, g, timeout_s) for r, g in zip(responses, golds)]


def is_correct_batch(responses: Sequence[str], golds: Sequence[str | int | float] | str | int | float) -> list[bool]:
    """``is_correct`` over many responses (one gold answer per response, or one for all)."""
    return [v.correct for v in check_batch(responses, golds)]


def solve_rate(responses: Iterable[str], golds: Sequence[str | int | float] | str | int | float) -> float:
    """Fraction of responses scored correct (0.0 for no responses)."""
    responses = list(responses)
    flags = is_correct_batch(responses, golds)
    return sum(flags) / len(flags) if flags else 0.0
