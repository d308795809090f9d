"""The summary of scripts/gpu_check.sh: ``summary.json`` and ``summary.md`` in its output folder.

Reads the stage records (TSV: name, pass|fail|skip, seconds, detail), the versions the chosen Python reported (JSON,
may be missing), the JUnit XML of the tests stage (per test: status, seconds, message and the numbers the tests
recorded with ``record_property``) and the benches' JSON rows. Standard library only: it runs with any python3, also
when setting up the environment failed.

    python3 scripts/gpu_check_report.py --out DIR --stages stages.tsv [--versions versions.json] ...
"""

import argparse
import json
import os
import platform
import socket
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

STATUSES = ("pass", "fail", "skip")
BENCHES = ("bench_block_drift", "bench_vocab_parallel")


def read_stages(path: Path) -> list:
    stages = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, seconds, detail = (line.split("\t") + [""] * 4)[:4]
        if status not in STATUSES:
            raise ValueError(f"{path}: stage {name!r} has status {status!r}, expected one of {STATUSES}")
        stages.append({"name": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
    return stages


def read_tests(path: Path) -> dict:
    """Per test case of a JUnit XML file: id, status (pass/fail/skip), seconds, message, recorded properties."""
    if not path.exists():
        return {"counts": {s: 0 for s in STATUSES}, "cases": [], "note": f"no {path.name}: the tests stage was "
                "skipped or did not finish (gpu_check.log has the per-test lines of a run)"}
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, message = "pass", ""
        for tag, as_status in (("failure", "fail"), ("error", "fail"), ("skipped", "skip")):
            element = case.find(tag)
            if element is not None:
                status = as_status
                text = (element.get("message") or element.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"id": f"{case.get('classname', '')}::{case.get('name', '')}", "status": status,
                      "seconds": round(float(case.get("time") or 0), 3), "message": message, "properties": props})
    counts = {s: sum(c["status"] == s for c in cases) for s in STATUSES}
    return {"counts": counts, "cases": cases}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def summary(args) -> dict:
    out = Path(args.out)
    stages = read_stages(Path(args.stages))
    return {
        "issue": 14,
        "dry_run": args.dry_run == "1",
        "started": args.started,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": args.seconds,
        "budget_s": args.budget,
        "commit": git_commit(),
        "host": {"name": socket.gethostname(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "env_mode": args.env_mode or None,
        "versions": read_json(Path(args.versions)) if args.versions else None,
        "stages": stages,
        "counts": {s: sum(st["status"] == s for st in stages) for s in STATUSES},
        "tests": read_tests(out / "tests.xml"),
        "benches": {name: read_json(out / f"{name}.json") for name in BENCHES},
    }


def _table(header, rows) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def _fmt(x, digits=3):
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _vocab_rows(rows) -> list:
    """bench_vocab_parallel's rows with time relative to megatron's cross-entropy and memory to the naive path."""
    by_path = {(r["vocab"], r["n"], r["tp"], r["op"], r["path"]): r for r in rows}
    out = []
    for r in rows:
        key = (r["vocab"], r["n"], r["tp"], r["op"])
        meg, naive = by_path.get(key + ("megatron CE",)), by_path.get(key + ("naive",))
        out.append((r["vocab"], r["n"], r["tp"], r["op"], r["path"], _fmt(r["seconds"]),
                    _fmt(r["seconds"] / meg["seconds"]) if meg else "", round(r["mib"]),
                    _fmt(r["mib"] / naive["mib"]) if naive and naive["mib"] > 0 else "", round(r["comm_per_pos"])))
    return out


def markdown(s: dict) -> str:
    v = s["versions"] or {}
    lines = [f"# GPU check (issue 14){' - dry run' if s['dry_run'] else ''}", "",
             f"{s['started']} to {s['finished']} ({s['seconds']} s of a {s['budget_s']} s budget), commit "
             f"{s['commit']}, host {s['host']['name']} ({s['host']['cpus']} CPUs).", "",
             f"GPU: {v.get('gpu', 'none seen')} (capability {v.get('gpu_capability', '-')}); environment: "
             f"{s['env_mode'] or '-'}; Python {v.get('python', '-')}, torch {v.get('torch', '-')} (CUDA "
             f"{v.get('torch_cuda', '-')}), megatron-core {v.get('megatron-core', '-')}, transformers "
             f"{v.get('transformers', '-')}, Transformer Engine {v.get('transformer-engine') or 'not installed'}; "
             f"nvcc: {v.get('nvcc') or '-'}; extension CUDA kernel: {v.get('extension_cuda_kernel', '-')}.", "",
             "## Stages", ""]
    lines += _table(["stage", "result", "s", "detail"],
                    [(st["name"], st["status"], st["seconds"], st["detail"]) for st in s["stages"]])
    tests = s["tests"]
    counts = tests["counts"]
    lines += ["", f"## Tests (pytest -m gpu): {counts['pass']} passed, {counts['fail']} failed, "
              f"{counts['skip']} skipped", ""]
    if tests.get("note"):
        lines.append(tests["note"])
    shown = [c for c in tests["cases"] if c["status"] == "fail" or (c["status"] == "pass" and c["properties"])]
    if shown:
        lines += _table(["test", "result", "s", "message / numbers"],
                        [(c["id"], c["status"], c["seconds"],
                          c["message"] or "; ".join(f"{k}={val}" for k, val in c["properties"].items()))
                         for c in shown])
    skips = {}
    for c in tests["cases"]:
        if c["status"] == "skip":
            skips[c["message"]] = skips.get(c["message"], 0) + 1
    lines += [""] * bool(shown and skips) + [f"- {n} skipped: {message}" for message, n in skips.items()]
    rows = s["benches"]["bench_block_drift"]
    lines += ["", "## bench_block_drift (ms, median of 21 calls)", ""]
    lines += _table(["device", "n", "extension", "reference", "copy", "ref/ext", "ext/copy"],
                    [(r["device"], f"{r['n']:.0e}", _fmt(r["extension_ms"]), _fmt(r["reference_ms"]),
                      _fmt(r["copy_ms"]), _fmt(r["ref_over_ext"]), _fmt(r["ext_over_copy"])) for r in rows]) \
        if rows else ["no results"]
    rows = s["benches"]["bench_vocab_parallel"]
    lines += ["", "## bench_vocab_parallel (best of 3; peak extra CUDA MiB)", ""]
    lines += _table(["V", "tokens", "TP", "op", "path", "time s", "x megatron CE", "peak MiB", "x naive",
                     "comm B/pos"], _vocab_rows(rows)) if rows else ["no results"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", required=True)
    parser.add_argument("--versions")
    parser.add_argument("--started", default="")
    parser.add_argument("--seconds", type=int, default=0)
    parser.add_argument("--budget", type=int, default=0)
    parser.add_argument("--env-mode", default="")
    parser.add_argument("--dry-run", choices=("0", "1"), default="0")
    args = parser.parse_args(argv)
    s = summary(args)
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(s))
    print(markdown(s))


if __name__ == "__main__":
    main()
