"""Every example config parses, and its parallel layout and batch sizes check out for the cluster it is written
for (dry run: no processes, model sizes from the Qwen3 size in the model path)."""

from pathlib import Path

import pytest

from megatron_bpd.train.__main__ import main as train_main
from megatron_bpd.train.config import load_config
from megatron_bpd.train.layout import check_layout, rank_groups

EXAMPLES = sorted(p for p in (Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml")
                  if not p.name.startswith("base"))


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
