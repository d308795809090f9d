"""The distillation trainer end to end on tiny Qwen3 models with embedded SGLang-protocol servers: a torchrun launch
at TP=2, exact resume, a rollout server crash, config errors, and (``-m gpu``) the CPU demo's setup on a GPU in bf16
with Megatron's distributed optimizer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distributed import run_distributed
from megatron_bpd.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_bpd.models.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("trainer")
    sizes = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=96, vocab=400)
    make_tiny_qwen3(root / "student", seed=0, **sizes)
    make_tiny_qwen3(root / "teacher", seed=1, **sizes)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n")
    return root


def write_config(tiny, out, **sections):
    config = {
        "out": str(out), "steps": 3, "seed": 7,
        "model": {"student": str(tiny / "student")},
        "data": {"prompts": str(tiny / "prompts.jsonl"), "answer_checker": "none"},
        "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 12, "max_concurrency": 1},
        "teacher": {"source": "sglang", "model": str(tiny / "teacher"), "top_k": 4},
        "loss": {"kind": "sampled_token", "gate": {"block_size": 4}},
        "reuse": {"epochs": 2, "minibatches": 2},
        "optimizer": {"lr": 3.0e-3},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = Path(out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_tp2_distills_and_server_logprobs_match_megatron(tiny, tmp_path):
    out = tmp_path / "tp2"
    config = write_config(tiny, out, parallel={"tp": 2}, loss={"kind": "topk_lsm", "gate": {"granularity": "span"}})
    torchrun(config, 2)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        # the server's behavior log-probs equal the Megatron student's recomputed ones (same weights, TP=2)
        assert r["rollout_train_mismatch"] < 1e-5
        assert r["gate_min"] <= r["gate_mean"] <= r["gate_max"]
        assert abs(r["gate_mean"] - 1.0) < 1e-4
        assert r["support_kl"] >= 0
    assert records[-1]["support_kl"] < records[0]["support_kl"], "LSM did not move the student towards the teacher"
    assert (out / "tensorboard").is_dir()
    assert len(list((out / "weights").iterdir())) == 4  # the initial push and one per step


def _run_trainer(rank, world_size, config_path, steps, resume, kill_server_before_step=None):
    from megatron_bpd.train.config import load_config
    from megatron_bpd.train.trainer import Trainer

    config = load_config(config_path, [f"steps={steps}"] + (["checkpoint.resume=true"] if resume else []))
    trainer = Trainer(config)
    if kill_server_before_step is None:
        trainer.run()
        return None
    trainer.config.steps = kill_server_before_step
    original_stop = trainer.servers.stop
    trainer.servers.stop = lambda: None  # keep the servers across the two halves of this run
    trainer.run()
    dead = trainer.servers.embedded[0][1]
    dead.proc.kill()
    dead.proc.wait()
    trainer.config.steps = steps
    trainer.servers.stop = original_stop
    trainer.run()
    return {"restarted": trainer.servers.embedded[0][1] is not dead}


def torchrun(config, nproc, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "megatron_bpd.train", "--config", str(config), *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def reference_block_gates(drift, block, tau=1.0):
    """method.md's gates of one sequence (scope = one trajectory), in float64: D_s = mean drift of block s,
    g_s = exp(-tau |D_s|), normalized to mean 1 over the positions."""
    drift = np.asarray(drift, dtype=np.float64)
    raw = np.concatenate([np.full(len(drift[i:i + block]), np.exp(-tau * abs(drift[i:i + block].mean())))
                          for i in range(0, len(drift), block)])
    return raw / raw.mean()


@pytest.mark.newest_only
def test_resume_and_data_parallelism_give_the_losses_of_one_uninterrupted_process(tiny, tmp_path):
    whole = write_config(tiny, tmp_path / "whole", steps=4, gate_trace=3)
    run_distributed(_run_trainer, 1, str(whole), 4, False)
    torchrun(whole, 2, f"out={tmp_path / 'dp2'}")  # DP=2: each rank trains on half of every mini-batch
    split = write_config(tiny, tmp_path / "split", checkpoint={"dir": str(tmp_path / "ckpt"), "every": 1})
    run_distributed(_run_trainer, 1, str(split), 2, False)
    run_distributed(_run_trainer, 1, str(split), 4, True)
    expected = read_metrics(tmp_path / "whole")
    for other in ("split", "dp2"):
        got = read_metrics(tmp_path / other)
        assert [r["step"] for r in got] == [0, 1, 2, 3], other
        for a, b in zip(expected, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-8), (other, a["step"])
            assert b["drift_abs_mean"] == pytest.approx(a["drift_abs_mean"], rel=1e-5, abs=1e-8), (other, a["step"])

    # The gate trace: the same under DP=2 as in one process, and method.md's gates of the traced drift (micro-batch
    # size 1: the normalization scope is one trajectory; every response token is a loss position here).
    trace = [json.loads(line) for line in (tmp_path / "whole" / "gate_trace.jsonl").read_text().splitlines()]
    trace_dp2 = [json.loads(line) for line in (tmp_path / "dp2" / "gate_trace.jsonl").read_text().splitlines()]
    key = lambda r: (r["step"], r["epoch"], r["minibatch"], r["trajectory"])  # noqa: E731
    assert sorted(map(key, trace)) == sorted(map(key, trace_dp2))
    assert {r["trajectory"] for r in trace} == {0, 1, 2} and {r["step"] for r in trace} == {0, 1, 2, 3}
    dp2 = {key(r): r for r in trace_dp2}
    for r in trace:
        assert len(r["drift"]) == len(r["gate"]) == len(r["response_ids"]) > 0
        assert dp2[key(r)]["response_ids"] == r["response_ids"]
        np.testing.assert_allclose(dp2[key(r)]["drift"], r["drift"], atol=2e-5)
        np.testing.assert_allclose(dp2[key(r)]["gate"], r["gate"], atol=2e-5)
        np.testing.assert_allclose(r["gate"], reference_block_gates(r["drift"], 4), atol=1e-4)
    first = [r for r in trace if r["epoch"] == 0 and r["minibatch"] == 0]
    later = [r for r in trace if r["epoch"] == 1]
    assert first and all(max(map(abs, r["drift"])) < 1e-4 for r in first)  # fresh rollout: pi_theta == pi_old
    assert later and max(max(map(abs, r["drift"])) for r in later) > 1e-3  # reuse: the student has moved


@pytest.mark.newest_only
def test_a_crashed_rollout_server_is_restarted_and_the_run_goes_on(tiny, tmp_path):
    config = write_config(tiny, tmp_path / "crash")
    (result,) = run_distributed(_run_trainer, 1, str(config), 3, False, 1)
    assert result["restarted"]
    records = read_metrics(tmp_path / "crash")
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[-1]["rollout_train_mismatch"] < 1e-5  # the new server got the newest weights


def _first_update_data(rank, world_size, config_path):
    """Run the trainer; return the trajectories its first optimizer step trained on."""
    from megatron_bpd.train.config import load_config
    from megatron_bpd.train.trainer import Trainer

    trainer = Trainer(load_config(config_path))
    seen, update = [], trainer.update
    trainer.update = lambda data, rows, *rest: (seen.append(data.trajectories.select(rows)), update(data, rows, *rest))
    trainer.run()
    return seen[0]


def lsm_reference(tiny, trajectories, top_k: int, tail: bool, fraction: float) -> float:
    """method.md's LSM loss of one fresh-rollout update (gates 1), float64 with transformers, position by position:
    S_t = teacher top-K (+ y_t if ``tail`` and y_t is not in it), l_t = sum_S p~_s clamp(log p~_s - log p~_q, +-5),
    mean over the ``fraction`` of valid positions of the batch with the highest student entropy."""
    import torch
    from transformers import AutoModelForCausalLM

    student, teacher = (AutoModelForCausalLM.from_pretrained(tiny / name, torch_dtype=torch.float64).eval()
                        for name in ("student", "teacher"))
    entropies, losses = [], []
    for prompt, response, mask in zip(trajectories.prompt_ids, trajectories.response_ids, trajectories.loss_mask):
        ids = torch.tensor([prompt + response])
        span = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
        with torch.no_grad():
            s_logits, t_logits = student(ids).logits[0, span], teacher(ids).logits[0, span]
        s_logp, t_logp = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
        for t, y in enumerate(response):
            if not mask[t]:
                continue
            entropies.append(float(-(s_logp[t].exp() * s_logp[t]).sum()))
            support = t_logp[t].topk(top_k).indices.tolist()
            if tail and y not in support:
                support.append(y)
            p_s, p_q = s_logits[t, support].log_softmax(-1), t_logp[t, support].log_softmax(-1)
            losses.append(float((p_s.exp() * (p_s - p_q).clamp(-5, 5)).sum()))
    keep = max(1, int(round(fraction * len(entropies))))
    cutoff = sorted(entropies, reverse=True)[keep - 1]
    kept = [l for h, l in zip(entropies, losses) if h >= cutoff]
    return sum(kept) / len(kept)


def test_lsm_tail_and_top_entropy_filter_give_the_formula_of_method_md(tiny, tmp_path):
    out = tmp_path / "lsm-options"
    config = write_config(tiny, out, steps=1, reuse={"epochs": 1, "minibatches": 1},
                          rollout={"max_new_tokens": 16, "top_p": 1.0},
                          loss={"kind": "topk_lsm", "tail": True, "top_entropy_fraction": 0.3})
    (trajectories,) = run_distributed(_first_update_data, 1, str(config))
    (record,) = read_metrics(out)
    expected = lsm_reference(tiny, trajectories, 4, tail=True, fraction=0.3)
    assert record["loss"] == pytest.approx(expected, rel=2e-5)
    # the test can tell the options apart: without either one the loss is another number
    for tail, fraction in ((False, 0.3), (True, 1.0)):
        assert abs(lsm_reference(tiny, trajectories, 4, tail, fraction) - expected) > 1e-3 * abs(expected)


class Crash(Exception):
    pass


def _overlapped_run(rank, world_size, config_path, overrides, crash_at=None, kill_at=None):
    """Run the trainer; return {step: (trajectories, [rows of each update])} of what it trained on, whether a
    student server was killed (SIGKILL, inside step ``kill_at``'s rollout) and restarted; ``crash_at``: the trainer
    raises when it starts that step (after the checkpoint of the step before)."""
    from megatron_bpd.train.config import load_config
    from megatron_bpd.train.data import PromptDataset
    from megatron_bpd.train.trainer import Trainer

    trainer = Trainer(load_config(config_path, overrides))
    trained, killed = {}, []
    update, rollout, train_step = trainer.update, trainer.sample, trainer.train_step

    def spy_update(data, rows, *rest):
        trained.setdefault(trainer.step, (data.trajectories, []))[1].append(list(rows))
        return update(data, rows, *rest)

    async def killing_rollout(client, teacher, step, prompts):
        if step == kill_at and not killed:
            killed.append(trainer.servers.embedded[0][1])
            killed[0].kill()
        return await rollout(client, teacher, step, prompts)

    def crashing_step():
        if trainer.step == crash_at:
            raise Crash()
        return train_step()

    trainer.update, trainer.sample, trainer.train_step = spy_update, killing_rollout, crashing_step
    try:
        trainer.run()
    except Crash:
        pass
    c = trainer.config  # the prompts of every step, from a dataset of its own
    dataset = PromptDataset(c.data.prompts, trainer.tokenizer, c.data.prompt_template, c.data.apply_chat_template,
                            c.data.max_prompt_len, c.seed, c.data.shuffle)
    prompts = [[p.token_ids for p in dataset.next_batch(c.rollout.prompts_per_step)] for _ in range(c.steps)]
    return {"trained": trained, "prompts": prompts,
            "restarted": bool(killed) and trainer.servers.embedded[0][1] is not killed[0]}


def check_trained_once(run, steps, config):
    """Every step trained on its own prompts' rollout (none lost, none twice), with every sample of every prompt
    once per reuse epoch."""
    samples, per_step = config["rollout"]["samples_per_prompt"], 0
    assert sorted(run["trained"]) == list(steps)
    for step, (trajectories, updates) in run["trained"].items():
        assert trajectories.prompt_ids == [p for p in run["prompts"][step] for _ in range(samples)], step
        per_step = len(run["prompts"][step]) * samples
        assert len(trajectories) == per_step and "abort" not in trajectories.finish_reason
        rows = sorted(r for update in updates for r in update)
        assert rows == sorted(list(range(per_step)) * config["reuse"]["epochs"])


@pytest.mark.parametrize("k, old", [(1, "rollout"), (2, "recompute")])
def test_overlapped_rollouts_train_every_trajectory_once_within_the_staleness_bound(tiny, tmp_path, k, old):
    """pi_old is the policy that sampled ("rollout") or the current weights before the step ("recompute": then the
    log-probs of trajectories sampled with older weights are compared with the behavior's, as the drift since
    sampling, and those of fresh ones as the rollout/train mismatch; and the loss is decoupled PPO, weighted by
    the truncated pi_old / pi_behavior: drift control "tis")."""
    overlap = {"rollout": {"max_staleness": k}, "reuse": {"epochs": 2, "minibatches": 2, "old_logprobs": old},
               "optimizer": {"lr": 1e-4}}  # small steps: the student keeps sampling different responses
    cap = 1.05 if old == "recompute" else None  # binds on some drifted tokens
    if cap is not None:
        overlap["loss"] = {"drift_control": {"kind": "tis", "cap": cap}}
    config = write_config(tiny, tmp_path / "overlap", steps=4, **overlap)
    (run,) = run_distributed(_overlapped_run, 1, str(config), [])
    check_trained_once(run, range(4), yaml.safe_load(config.read_text()))
    for r in read_metrics(tmp_path / "overlap"):
        # step s samples with the weights of step max(s - k, 0): the bound is met exactly, never exceeded
        assert r["staleness_max"] == r["staleness_mean"] == min(r["step"], k)
        assert r["resampled_trajectories"] == 0
        if old == "rollout":
            assert "rollout_train_mismatch" not in r and "behavior_drift_abs_mean" not in r
            assert "drift_weight_mean" not in r
        elif r["staleness_max"] == 0:  # the sampler is pi_old: every weight is 1
            assert r["rollout_train_mismatch"] < 1e-5 and "behavior_drift_abs_mean" not in r
            assert r["drift_weight_mean"] == pytest.approx(1.0, abs=1e-4) and r["drift_weight_max"] < cap
        else:
            assert r["behavior_drift_abs_mean"] > 1e-4 and "rollout_train_mismatch" not in r
            assert 0 < r["drift_weight_mean"] <= cap and r["drift_weight_mean"] != pytest.approx(1.0, abs=1e-6)
        for key in ("time_wait_rollout", "time_wait_train", "time_generate", "rollout_tokens_per_s", "tokens_per_s"):
            assert r[key] >= 0, key
        for step, (trajectories, _) in run["trained"].items():
            assert set(trajectories.weight_version) == {str(max(step - k, 0))}
    # the servers end with the trainer's final weights
    assert sorted(int(p.name) for p in (tmp_path / "overlap" / "weights").iterdir())[-1] == 4


@pytest.mark.timeout(1500)  # three trainer runs
@pytest.mark.newest_only
def test_overlapped_resume_after_a_crash_and_a_killed_server_continue_exactly(tiny, tmp_path):
    """k = 2: a run that crashes after step 0's checkpoint and resumes (from it the rollouts of steps 1 and 2, then
    with a student server SIGKILLed inside step 3's rollout) trains on the same rollouts and gets the same losses as
    an uninterrupted run."""
    overlap = {"rollout": {"max_staleness": 2}, "reuse": {"epochs": 2, "minibatches": 2, "old_logprobs": "rollout"},
               "optimizer": {"lr": 1e-4}}
    whole = write_config(tiny, tmp_path / "whole", steps=4, **overlap)
    (reference,) = run_distributed(_overlapped_run, 1, str(whole), [])
    split = write_config(tiny, tmp_path / "split", steps=4, checkpoint={"dir": str(tmp_path / "ckpt"), "every": 1},
                         **overlap)
    (first,) = run_distributed(_overlapped_run, 1, str(split), [], 1)
    (second,) = run_distributed(_overlapped_run, 1, str(split), ["checkpoint.resume=true"], None, 3)
    check_trained_once(first, [0], yaml.safe_load(split.read_text()))
    check_trained_once(second, [1, 2, 3], yaml.safe_load(split.read_text()))
    assert second["restarted"]
    for step in range(4):
        got = (first if step < 1 else second)["trained"][step][0]
        assert got.response_ids == reference["trained"][step][0].response_ids, step
        assert got.weight_version == reference["trained"][step][0].weight_version, step
    expected, records = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for a, b in zip(expected, records):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-8), a["step"]
        assert b["drift_abs_mean"] == pytest.approx(a["drift_abs_mean"], rel=1e-5, abs=1e-8), a["step"]
    assert records[3]["resampled_trajectories"] == 4  # the killed server's step was sampled again, once


def test_unknown_config_keys_and_bad_layouts_are_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) rollout.samples"):
        load_config(None, ["rollout.samples=4"])
    with pytest.raises(ValueError, match="not of the form"):
        load_config(None, ["steps"])
    with pytest.raises(ValueError, match="'tis' reads pi_old / pi_behavior .* needs reuse.old_logprobs 'recompute'"):
        load_config(None, ["loss.drift_control.kind=tis", "reuse.old_logprobs=rollout"])
    config = load_config(write_config(tiny, tmp_path / "bad"), ["rollout.prompts_per_step=3", "reuse.minibatches=4"])
    from megatron_bpd.train.layout import check_layout

    with pytest.raises(ValueError, match="must be divisible"):
        check_layout(config, 1)
    with pytest.raises(ValueError, match="not divisible by TP x PP x CP"):
        check_layout(load_config(write_config(tiny, tmp_path / "bad2"), ["parallel.tp=2"]), 3)


@pytest.mark.parametrize("overrides, message", [
    (["rollout.policy=teacher", "teacher.source=megatron", "loss.kind=sft", "loss.gate.granularity=none"],
     "rollout.policy 'teacher' .* needs teacher.source 'sglang', got 'megatron'"),
    (["loss.temperature=0.7"], r"loss.temperature=0.7 must equal rollout.temperature=1.0"),
    (["data.answer_checker=arith"], "data.answer_checker must be one of math, none, arithmetic, addition"),
])
def test_dry_run_catches_every_cross_section_error_before_starting_anything(overrides, message):
    """The checks that need several sections run when the config is loaded, so ``--dry-run`` reports them too."""
    from megatron_bpd.train.__main__ import main

    with pytest.raises(ValueError, match=message):
        main(["--dry-run", "--world-size", "8", "model.student=/models/Qwen3-1.7B-Base", *overrides])


def _teacher_scores_agree(rank, world_size, config_path, teacher_dir):
    import asyncio

    import torch

    from megatron_bpd.rollout.client import ClientConfig, SGLangClient
    from megatron_bpd.rollout.teacher import SGLangTeacher
    from megatron_bpd.rollout.embedded import EmbeddedServer
    from megatron_bpd.train.config import load_config
    from megatron_bpd.train.rollout_data import RolloutData
    from megatron_bpd.train.trainer import Trainer

    trainer = Trainer(load_config(config_path))
    try:
        prompts = trainer.dataset.next_batch(2)
        trajectories, _ = trainer.servers.call(lambda client, _: trainer.sample(client, None, 0, prompts))
        inside = trainer.passes.megatron_teacher_scores(RolloutData(trajectories))
    finally:
        trainer.servers.stop()

    async def served():
        with EmbeddedServer(teacher_dir) as server:
            async with SGLangClient(ClientConfig(urls=[server.url])) as client:
                return await SGLangTeacher(client, top_k=4).score(trajectories)

    outside = asyncio.run(served())
    for b in range(len(trajectories)):
        torch.testing.assert_close(inside.token_logprobs[b], outside.token_logprobs[b], rtol=0, atol=2e-5)
        torch.testing.assert_close(inside.topk_logprobs[b], outside.topk_logprobs[b], rtol=0, atol=2e-5)
        assert torch.equal(inside.topk_ids[b], outside.topk_ids[b])
    return sum(len(r) for r in trajectories.response_ids)


def test_in_trainer_megatron_teacher_scores_equal_the_served_teacher(tiny, tmp_path):
    config = write_config(tiny, tmp_path / "megatron-teacher", teacher={"source": "megatron"})
    (scored,) = run_distributed(_teacher_scores_agree, 1, str(config), str(tiny / "teacher"))
    assert scored > 0


def test_numbers_in_yaml_and_overrides_are_coerced():
    config = load_config(None, ["optimizer.lr=3e-4", "loss.gate.tau=2"])
    assert config.optimizer.lr == 3e-4 and isinstance(config.loss.gate.tau, float)
    with pytest.raises(ValueError, match="optimizer.lr must be a number"):
        load_config(None, ["optimizer.lr=fast"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_only_optimizers_are_refused_on_cpu():
    from types import SimpleNamespace

    from megatron_bpd.train.setup import OptimizerSettings, wrap_for_training

    cpu_model = SimpleNamespace(config=SimpleNamespace(bf16=True, fp16=False))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        wrap_for_training(cpu_model, OptimizerSettings())
    cpu_model.config.bf16 = False
    with pytest.raises(ValueError, match="CUDA tensors only"):
        wrap_for_training(cpu_model, OptimizerSettings(use_distributed_optimizer=True))


# bf16 against the servers' float32 (measured on the earlier shipped 2-layer student): transformers' bf16 forward differs from its float32
# forward (same bf16-rounded weights) by 1.3e-3 nats per sampled token on average (max 0.09; bf16 keeps 8 significant
# bits, and the logits, up to ~28, are rounded to bf16 before the log-softmax). The bound leaves ~8x room for
# Megatron's different kernels. The same run in float32 on the CPU gives a mismatch of 3e-7 and a drift of 0.08-0.19
# per token (drift_abs_mean) at the learning rate below, so a server left on stale weights would fail the check.
BF16_MISMATCH_TOL = 1e-2


def demo_setup_config(out: Path, **sections) -> Path:
    """The CPU demo's run (shipped task models, Block-16 gate; ``experiment.TaskRun``) at TP=1 with a smaller batch,
    2 epochs x 2 mini-batches and a 3x learning rate, without held-out evaluation; ``sections`` update its
    sections."""
    from megatron_bpd.experiment import SHIPPED_MODELS, TaskRun
    from megatron_bpd.tasks.common import write_prompts_jsonl
    from megatron_bpd.tasks.sft import PrepConfig, datasets

    prompts = write_prompts_jsonl(out / "prompts.jsonl", datasets(PrepConfig(seed=0))[0][:64])
    config = TaskRun(str(out / "run"), str(SHIPPED_MODELS / "student"), str(SHIPPED_MODELS / "teacher"), str(prompts),
                     "", loss="sampled_token", gate={"granularity": "block", "block_size": 16}, steps=3, lr=1e-3,
                     prompts_per_step=4, samples_per_prompt=4, epochs=2, minibatches=2, micro_batch_size=4,
                     eval_every=0).config()
    for key, value in sections.items():
        config[key].update(value)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.gpu
def test_demo_setup_on_gpu_in_bf16_with_the_distributed_optimizer(tmp_path, record_property):
    config = demo_setup_config(tmp_path, model={"precision": "bf16"}, optimizer={"use_distributed_optimizer": True})
    run_distributed(_run_trainer, 1, str(config), 3, False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        record_property(f"step{r['step']}", {k: round(r[k], 6) for k in ("loss", "rollout_train_mismatch",
                                                                         "drift_abs_mean", "grad_norm", "time_train")})
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["rollout_train_mismatch"] < BF16_MISMATCH_TOL, r
        assert abs(r["gate_mean"] - 1.0) < 1e-3, r
    assert max(r["drift_abs_mean"] for r in records) > BF16_MISMATCH_TOL, "updates too small to test weight sync"


@pytest.mark.newest_only
def test_held_out_evaluation_is_the_same_at_tp1_and_tp2(tiny, tmp_path):
    """The trainer's evaluation (greedy / pass@k through the servers, the support-KL probe through Megatron) of the
    same weights gives the same numbers whatever the layout; evals.jsonl has the base model, each eval step and the
    teacher once."""
    runs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        config = write_config(tiny, out, steps=2, parallel={"tp": tp},
                              data={"prompts": str(tiny / "prompts.jsonl"), "answer_checker": "math"},
                              eval={"every": 1, "prompts": str(tiny / "prompts.jsonl"), "limit": 4, "samples": 2,
                                    "probe_prompts": 2, "probe_samples": 2})
        torchrun(config, tp)
        runs[tp] = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    for evals in runs.values():
        assert [e["step"] for e in evals] == [0, 1, 2]
        assert "teacher" in evals[0] and all("teacher" not in e for e in evals[1:])
        assert evals[0]["student"]["n"] == 4 and {"greedy", "pass1", "pass2"} <= set(evals[0]["student"])
    for a, b in zip(runs[1], runs[2]):
        assert b["support_kl"] == pytest.approx(a["support_kl"], rel=1e-5)
        assert b["student"]["greedy"] == a["student"]["greedy"] and b["student"]["pass1"] == a["student"]["pass1"]
    with pytest.raises(ValueError, match="answer_checker"):
        load_config(write_config(tiny, tmp_path / "no-checker", eval={"every": 1, "prompts": "x.jsonl"}))
    with pytest.raises(ValueError, match="needs eval.prompts"):
        load_config(None, ["eval.every=5"])
