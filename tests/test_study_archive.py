"""studies/archive.py: a finished run folder is packed with its paths made relative (the study's training folder
and the repository prefix of megatron_bpd/data cut off), read back as the run it was, written with the same bytes
for the same runs whatever the order they came in, and no member may name a machine's folder."""

import json

import pytest
import yaml

from studies.archive import RunArchive


def _run_dir(root, key, seconds):
    run = root / "runs" / key
    run.mkdir(parents=True)
    config = {"out": str(run), "model": {"student": "/home/someone/repo/megatron_bpd/data/task_models/student"},
              "data": {"prompts": str(root / "data" / "prompts.jsonl")}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "run.json").write_text(json.dumps({"seconds": seconds, "config": config}))
    (run / "evals.jsonl").write_text(json.dumps({"step": 0, "student": {"greedy": 0.5}}) + "\n")
    (run / "train.log").write_text(f"a log under {root}\n")  # not kept
    return run


def test_pack_relative_and_deterministic(tmp_path):
    scratch = tmp_path / "scratch"
    runs = {"a/seed0": _run_dir(scratch, "a/seed0", 1.5), "b/seed1": _run_dir(scratch, "b/seed1", 2.5)}
    first, second = RunArchive(tmp_path / "1" / "runs.tar.xz"), RunArchive(tmp_path / "2" / "runs.tar.xz")
    first.add(runs)
    second.add({"b/seed1": runs["b/seed1"]})
    second.add({"a/seed0": runs["a/seed0"]})
    assert (tmp_path / "1" / "runs.tar.xz").read_bytes() == (tmp_path / "2" / "runs.tar.xz").read_bytes()

    again = RunArchive(tmp_path / "1" / "runs.tar.xz")
    assert again.keys() == {"a/seed0", "b/seed1"} and again.summary() is None
    run = again.read("a/seed0")
    assert run["seconds"] == 1.5 and run["evals"] == [{"step": 0, "student": {"greedy": 0.5}}] and run["metrics"] == []
    assert set(run["files"]) == {"config.yaml", "run.json", "evals.jsonl"}
    config = yaml.safe_load(run["files"]["config.yaml"])
    assert config == {"out": "runs/a/seed0", "model": {"student": "megatron_bpd/data/task_models/student"},
                      "data": {"prompts": "data/prompts.jsonl"}}
    assert json.loads(run["files"]["run.json"])["config"] == config
    assert list((tmp_path / "1").iterdir()) == [tmp_path / "1" / "runs.tar.xz"]  # no lock or partial file left


def test_no_absolute_path_is_stored(tmp_path):
    archive = RunArchive(tmp_path / "runs.tar.xz")
    with pytest.raises(ValueError, match="absolute path"):
        archive.put({"x/seed0/run.json": json.dumps({"out": "/tmp/elsewhere/run"})})
    assert not (tmp_path / "runs.tar.xz").exists()
    archive.put({"results.json": json.dumps({"runs": []})})
    assert RunArchive(tmp_path / "runs.tar.xz").summary() == {"runs": []}
