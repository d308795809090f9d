"""One study's runs in one compressed file: ``OUT/runs.tar.xz``, a tar (xz) with one folder per run (``<key>/``:
``config.yaml``, ``run.json``, ``metrics.jsonl``, ``evals.jsonl`` and, where traced, ``gate_trace.jsonl``, as the
trainer wrote them) that a study's report is regenerated from. Members are written in key order with fixed
metadata, so the same runs give the same bytes; ``tar xJf runs.tar.xz`` unpacks it.

Paths are stored relative: the folder the study trained in (its ``out`` config holds ``<root>/runs/<key>``) and the
repository prefix of ``megatron_bpd/data/...`` are cut off while packing, and a path that still names a machine's
folder (``ABSOLUTE``) is an error. A study whose raw runs were never kept stores its ``results.json`` alone
(``summary``); the data of a superseded study is packed the same way (``python -m studies.archive ARCHIVE --file``).
``machine.json`` records the machine the runs trained on (``machine``), so a report regenerated elsewhere still
states it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from megatron_bpd.experiment import run_record

STORED = ("config.yaml", "run.json", "metrics.jsonl", "evals.jsonl", "gate_trace.jsonl")
SUMMARY = "results.json"
MACHINE = "machine.json"  # {"machine", "python"} of the machine the runs trained on, which the report states
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home)/")  # a folder of the machine a run ran on
_REPO_PREFIX = re.compile(r"(?<![\w.~-])/(?:[\w.+-]+/)+?(?=megatron_bpd/data/)")


def relative(text: str, root: str) -> str:
    """``text`` with ``root/`` (the study's training folder) and the repository prefix of ``megatron_bpd/data/``
    paths removed."""
    return _REPO_PREFIX.sub("", text.replace(root.rstrip("/") + "/", ""))


class RunArchive:
    """The runs of one study in ``path`` (``runs.tar.xz``): ``keys``, ``read``, ``add``, and ``summary`` for a study
    whose runs were never kept. Several processes may ``add`` to the same archive (a lock on its folder serializes
    them)."""

    def __init__(self, path):
        self.path = Path(path)
        self._files = self._load()

    def _load(self) -> dict:
        files = {}
        if self.path.exists():
            with tarfile.open(self.path, "r:xz") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        files[member.name] = tar.extractfile(member).read().decode()
        return files

    def keys(self) -> set:
        """The keys (``<name>/seed<k>``) of the runs held."""
        return {name.rsplit("/", 1)[0] for name in self._files if name.endswith("/run.json")}

    def read(self, key: str) -> dict:
        """``experiment.run_record`` of run ``key`` plus ``files`` (file name -> text)."""
        prefix = key + "/"
        files = {name[len(prefix):]: text for name, text in self._files.items() if name.startswith(prefix)}
        return run_record(files) | {"files": files}

    def summary(self) -> Optional[dict]:
        """The stored ``results.json`` of a study without runs, else None."""
        return json.loads(self._files[SUMMARY]) if SUMMARY in self._files else None

    def machine(self) -> Optional[dict]:
        """``{"machine", "python"}`` of the machine the runs trained on, else None."""
        return json.loads(self._files[MACHINE]) if MACHINE in self._files else None

    def add(self, runs: dict) -> None:
        """Pack finished runs (key -> the folder the trainer wrote) and rewrite the archive. A run's ``out`` config
        is ``<root>/runs/<key>``: ``root``, the folder the study trained in, is cut from its paths."""
        texts = {}
        for key, run_dir in runs.items():
            run_dir = Path(run_dir)
            root = Path(json.loads((run_dir / "run.json").read_text())["config"]["out"]).parents[key.count("/") + 1]
            texts |= {f"{key}/{name}": relative((run_dir / name).read_text(), str(root)) for name in STORED
                      if (run_dir / name).exists()}
        self.put(texts)

    def put(self, members: dict) -> None:
        """Add or replace members (name -> text) and rewrite the archive; texts must hold no absolute path."""
        for name, text in members.items():
            if ABSOLUTE.search(text):
                raise ValueError(f"{name}: an absolute path: {ABSOLUTE.search(text).group(0)}...")
        with self._locked():
            self._files = self._load()  # another worker may have added runs since
            self._files.update(members)
            self._write()

    def _write(self) -> None:
        """Write every member, sorted, with fixed metadata (mode 0644, no owner, time 0), atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        with tarfile.open(partial, "w:xz", format=tarfile.PAX_FORMAT, preset=9) as tar:
            for name in sorted(self._files):
                data = self._files[name].encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(partial, self.path)

    @contextmanager
    def _locked(self):
        """Hold an exclusive lock on the archive's folder (no lock file is left behind)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the lock


def main(argv=None) -> None:
    """``python -m studies.archive ARCHIVE [--runs DIR] [--file NAME=PATH ...]``: pack the runs a study trained into
    ``DIR/runs/<name>/seed<k>/`` elsewhere (an older checkout, another machine), or other files, into ARCHIVE."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("archive", type=Path)
    parser.add_argument("--runs", type=Path, help="a study's output folder with runs/<name>/seed<k>/run.json")
    parser.add_argument("--file", nargs="+", default=[], metavar="NAME=PATH", help="a member and where its text is")
    args = parser.parse_args(argv)
    archive = RunArchive(args.archive)
    if args.runs:
        archive.add({str(p.parent.relative_to(args.runs / "runs")): p.parent
                     for p in sorted((args.runs / "runs").glob("*/seed*/run.json"))})
    if args.file:
        archive.put({name: Path(path).read_text() for name, path in (item.split("=", 1) for item in args.file)})
    print(f"{args.archive}: {len(archive.keys())} runs, {args.archive.stat().st_size} bytes")


if __name__ == "__main__":
    main()
