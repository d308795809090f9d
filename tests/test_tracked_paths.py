"""No tracked file, and no member of a tracked archive (the studies' runs.tar.xz), names a folder of the machine it
was made on (/work/, /tmp/, /root/, /home/), except those in ``ALLOWED``: the scratch folders of example commands and
the inputs of the archive's own test."""

import re
import subprocess
import tarfile
from pathlib import Path

from studies.archive import ABSOLUTE

ROOT = Path(__file__).resolve().parents[1]
PATH = ABSOLUTE.pattern + r"[^\s\"'`),]*"
ALLOWED = {  # file -> the absolute paths it may name: scratch folders in usage examples
    "BENCHMARKS.md": {"/tmp/bench-qwen3"},
    "bench/bench_convert.py": {"/tmp/bench-qwen3"},
    "megatron_bpd/data/task_models/README.md": {"/tmp/tk/cli"},
    "megatron_bpd/eval/README.md": {"/tmp/tiny", "/tmp/ev"},
    "megatron_bpd/eval/cli.py": {"/tmp/tiny", "/tmp/ev"},
    # the machine paths that packing must cut or refuse
    "tests/test_study_archive.py": {"/home/someone/repo/megatron_bpd/data/task_models/student", "/tmp/elsewhere/run"},
}
SELF = "tests/test_tracked_paths.py"  # holds ALLOWED


def _texts():
    """(name, text) of every tracked text file and of every member of a tracked .tar.xz."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in (n.decode() for n in names if n):
        path = ROOT / name
        if name.endswith(".tar.xz"):
            with tarfile.open(path, "r:xz") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        yield f"{name}:{member.name}", tar.extractfile(member).read().decode()
        elif path.is_file() and name != SELF:
            data = path.read_bytes()
            if b"\0" not in data:
                try:
                    yield name, data.decode()
                except UnicodeDecodeError:
                    pass


def test_no_absolute_machine_paths():
    found = {}
    for name, text in _texts():
        paths = set(re.findall(PATH, text)) - ALLOWED.get(name, set())
        if paths:
            found[name] = sorted(paths)[:3]
    assert not found, found
