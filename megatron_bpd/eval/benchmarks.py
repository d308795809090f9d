"""The shipped math benchmarks (megatron_bpd/data/benchmarks/*.jsonl, see SOURCES.md there) as ``Problem`` lists.

Fields are normalized across the four files: ``problem`` (the statement), ``answer`` (a LaTeX string; AMC23's float
answers such as 27.0 become "27"), ``id`` ("<benchmark>/<id in the file>", or the line number where the file has
none), ``solution`` (AIME24 and MATH500 only) and ``meta`` (the remaining fields: url, subject, level, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megatron_bpd.eval.answers import normalize_gold

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "benchmarks"
BENCHMARKS = ("math500", "aime24", "aime25", "amc23")  # the paper's column order
_ID_FIELDS = {"aime24": "id", "amc23": "id", "math500": "unique_id"}


@dataclass(frozen=True)
class Problem:
    benchmark: str
    id: str
    problem: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def available_benchmarks(data_dir: str | Path | None = None) -> list[str]:
    """Benchmark names with a JSONL file in ``data_dir`` (default: the shipped data), known ones first."""
    names = {p.stem for p in Path(data_dir or DATA_DIR).glob("*.jsonl")}
    return [b for b in BENCHMARKS if b in names] + sorted(names - set(BENCHMARKS))


def load_benchmark(name: str, limit: int | None = None, data_dir: str | Path | None = None) -> list[Problem]:
    """The first ``limit`` problems (all when None) of benchmark ``name``, in file order."""
    path = Path(data_dir or DATA_DIR) / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"unknown benchmark {name!r}: no {path}; available: {available_benchmarks(data_dir)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    problems = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            if limit is not None and len(problems) >= limit:
                break
            row = json.loads(line)
            problems.append(normalize_row(name, row, line_no, path))
    return problems


def normalize_row(name: str, row: dict[str, Any], line_no: int, path: Path | str = "?") -> Problem:
    text = row.get("problem", row.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}:{line_no + 1}: no problem text")
    if "answer" not in row or row["answer"] is None or row["answer"] == "":
        raise ValueError(f"{path}:{line_no + 1}: no answer")
    id_field = _ID_FIELDS.get(name, "id")
    raw_id = row.get(id_field, line_no)
    meta = {k: v for k, v in row.items() if k not in {"problem", "question", "answer", "solution", id_field}}
    return Problem(benchmark=name, id=f"{name}/{raw_id}", problem=text, answer=normalize_gold(row["answer"]),
                   solution=row.get("solution"), meta=meta)


def load_benchmarks(names: Sequence[str] | None = None, limit: int | None = None,
                    data_dir: str | Path | None = None) -> dict[str, list[Problem]]:
    """``{name: problems}`` for ``names`` (default: all shipped benchmarks)."""
    names = list(names) if names else available_benchmarks(data_dir)
    if len(set(names)) != len(names):
        raise ValueError(f"benchmarks listed twice: {names}")
    return {n: load_benchmark(n, limit, data_dir) for n in names}
