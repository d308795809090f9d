"""Every ``bench/bench_*.py`` runs end to end with tiny arguments and prints a table with numbers (no timings are
checked: these say the scripts still work, not how fast anything is)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+(\.\d+)?(e[+-]?\d+)?x?"


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    """The cells of the Markdown table rows of ``text`` that start with ``first_cell``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} ")]


def numeric(cells: list[str]) -> bool:
    return all(re.fullmatch(NUMBER, c) or c in ("-", "") for c in cells)


def check_engine(out: str, tmp: Path) -> None:
    rows = json.loads((tmp / "engine.json").read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("student", 1), ("student", 2)]
    for r in rows:
        assert all(r[k] > 0 for k in ("engine_tokens_per_s", "hf_tokens_per_s", "roofline_tokens_per_s"))
    assert len(table_rows(out, "student")) == 2


def check_rollout(out: str, tmp: Path) -> None:
    rows = [r for r in (table_rows(out, "1") + table_rows(out, "2")) if len(r) == 6]
    assert len(rows) == 2 and all(numeric(r) and float(r[1]) > 0 for r in rows)


def check_block_drift(out: str, tmp: Path) -> None:
    rows = table_rows(out, "cpu, 1 thread")
    assert rows and all(numeric(r[1:]) for r in rows)


def check_vocab_parallel(out: str, tmp: Path) -> None:
    rows = table_rows(out, "512")
    assert {r[3] for r in rows} >= {"topk", "LSM loss"} and all(float(r[5]) >= 0 for r in rows)


def check_gate_step(out: str, tmp: Path) -> None:
    assert {r[0] for r in table_rows(out, "block64") + table_rows(out, "none")} == {"block64", "none"}
    assert re.search(r"block64 / none: \d+\.\d+x", out)


def check_fused_head(out: str, tmp: Path) -> None:
    (row,) = table_rows(out, "logprobs")
    assert row[:3] == ["logprobs", "1", "8"] and float(row[3]) > 0 and float(row[5]) > 0


def check_convert(out: str, tmp: Path) -> None:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"run"')]
    assert [r["run"] for r in rows] == ["convert", "export"] and all(r["seconds"] >= 0 for r in rows)
    assert not (tmp / "work").exists()  # the scratch folder is removed


def check_overlap(out: str, tmp: Path) -> None:
    (result,) = json.loads(out.strip().splitlines()[-1])
    assert result["k"] == 1 and result["steps_per_s"] > 0 and result["time_generate"] > 0


def check_drift_controls(out: str, tmp: Path) -> None:
    rows = {r[0]: r for r in table_rows(out, "none") + [r for c in ("token_drop", "icepop", "tis", "seq_mask", "m2po")
                                                        for r in table_rows(out, c)]}
    assert set(rows) == {"none", "token_drop", "icepop", "tis", "seq_mask", "m2po"}
    assert rows["none"][3] == "1.000x" and all(float(r[1]) > 0 for r in rows.values())


def check_train_step(out: str, tmp: Path) -> None:
    rows = {r[0]: r for name in ("hf", "megatron", "plugin", "plugin+gate") for r in table_rows(out, name)}
    assert set(rows) == {"hf", "megatron", "plugin", "plugin+gate"} and rows["hf"][3] == "1.00x"
    assert all(float(r[1]) > 0 for r in rows.values())


def check_step_memory(out: str, tmp: Path) -> None:
    rows = table_rows(out, "fused") + table_rows(out, "unfused")
    assert [r[:2] for r in rows] == [["fused", "64"], ["unfused", "64"]]
    assert all(numeric(r[2:]) and float(r[5]) > 0 for r in rows)  # the step adds to the resident set


SCRIPTS = {
    "bench_engine": (["--smoke", "--json", "{tmp}/engine.json"], check_engine),
    "bench_rollout": (["--smoke"], check_rollout),
    "bench_block_drift": (["--sizes", "1000", "--repeats", "1", "--threads", "1", "--device", "cpu"],
                          check_block_drift),
    "bench_vocab_parallel": (["--configs", "512:64:1", "--repeats", "1"], check_vocab_parallel),
    "bench_gate_step": (["--hidden", "64", "--layers", "1", "--vocab", "512", "--batch", "1", "--seq", "64",
                         "--repeats", "1"], check_gate_step),
    "bench_fused_head": (["--tokens", "8", "--tp", "1", "--hidden", "64", "--vocab", "512", "--paths", "fused",
                          "--project", "16"], check_fused_head),
    "bench_convert": (["--work", "{tmp}/work", "--smoke"], check_convert),
    "bench_overlap": (["--smoke"], check_overlap),
    "bench_drift_controls": (["--smoke"], check_drift_controls),
    "bench_train_step": (["--smoke"], check_train_step),
    "bench_step_memory": (["--smoke"], check_step_memory),
}


def test_every_bench_script_has_a_smoke_test():
    assert {p.stem for p in (ROOT / "bench").glob("bench_*.py")} == set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bench_script_smoke(name, tmp_path):
    args, check = SCRIPTS[name]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"),
                           *(a.format(tmp=tmp_path) for a in args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(proc.stdout, tmp_path)
