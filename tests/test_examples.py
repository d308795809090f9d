"""Every example config parses, and its parallel layout and batch sizes check out for the cluster it is written
for (dry run: no processes, model sizes from the Qwen3 size in the model path); the launch scripts give every SGLang
server and the router an API key (serve_sglang.sh --dry-run: the command lines, nothing started)."""

import os
import subprocess
from pathlib import Path

import pytest

from megatron_bpd.train.__main__ import main as train_main
from megatron_bpd.train.config import load_config
from megatron_bpd.train.layout import check_layout, rank_groups

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted(p for p in (ROOT / "examples" / "configs").glob("*.yaml") if not p.name.startswith("base"))


def test_six_variants():
    assert [p.stem for p in EXAMPLES] == [f"{k}_{g}" for k in ("sampled_token", "topk_lsm")
                                          for g in ("block64", "newline", "none")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_dry_run(path, capsys):
    config = load_config(str(path))
    assert config.steps == 200 and config.optimizer.lr == 2e-6 and config.reuse.epochs == 2
    assert config.rollout.prompts_per_step * config.rollout.samples_per_prompt == 32
    assert config.teacher.top_k == 32 and config.rollout.top_p == 0.9 and config.rollout.max_new_tokens == 16384
    kind, gate = path.stem.rsplit("_", 1)
    assert config.loss.kind == kind
    assert config.loss.gate.granularity == {"none": "none", "block64": "block", "newline": "span"}[gate]
    train_main(["--config", str(path), "--dry-run", "--world-size", "8"])
    assert "world 8 = TP 2 x CP 2 x DP 2 x PP 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not divisible"):
        check_layout(config, 6)


def test_rank_groups_follow_megatron_order():
    groups = rank_groups(tp=2, pp=2, cp=1, dp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _serve_dry_run(env: dict) -> list:
    """The command lines serve_sglang.sh --dry-run prints, one list of words per line."""
    out = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "serve_sglang.sh"), "--dry-run", "/m/student",
                          "/m/teacher"], env=env, capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_every_server_and_the_router_require_the_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_API_KEY")} | {"HOME": str(tmp_path)}
    lines = _serve_dry_run(env | {"SGLANG_API_KEY": "k3y-from-the-environment"})
    servers = [w for w in lines if "sglang.launch_server" in w]
    routers = [w for w in lines if "sglang_router.launch_router" in w]
    assert len(servers) == 5 and len(routers) == 1 and len(lines) == 6
    for words in servers + routers:
        assert words[words.index("--host") + 1] == "0.0.0.0"
        assert words[words.index("--api-key") + 1] == "$SGLANG_API_KEY"  # the key itself is never printed
    assert "k3y-from-the-environment" not in str(lines)
    assert not (tmp_path / ".config").exists()  # a key in the environment is used as it is

    # Unset: a random key is generated once into the key file (mode 600) and used from then on.
    _serve_dry_run(env)
    key_file = tmp_path / ".config" / "megatron-bpd" / "sglang_api_key"
    key = key_file.read_text()
    assert len(key.strip()) >= 32 and key_file.stat().st_mode & 0o777 == 0o600
    assert [w for w in _serve_dry_run(env) if "--api-key" in w] == servers + routers and key_file.read_text() == key


def test_the_trainer_gets_the_key(tmp_path):
    """train_torchrun.sh with a stand-in torchrun: the trainer's environment holds the key from the key file."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "torchrun").write_text('#!/usr/bin/env bash\necho "key=$SGLANG_API_KEY"\n')
    (tmp_path / "bin" / "torchrun").chmod(0o755)
    key_file = tmp_path / "key"
    key_file.write_text("shared-k3y\n")
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_API_KEY"} | {
        "HOME": str(tmp_path), "SGLANG_API_KEY_FILE": str(key_file),
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "examples" / "launch" / "train_torchrun.sh"), "config.yaml"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out == "key=shared-k3y\n"
    sbatch = ROOT / "examples" / "slurm" / "distill.sbatch"
    assert "source examples/launch/api_key.sh" in sbatch.read_text()
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
