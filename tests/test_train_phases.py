"""The trainer's phases, each alone (no Trainer): micro-batches and back (``rollout_data``), the no-grad scoring
passes (``passes``), one update with its gate trace (``update``, ``gate_trace``), the step sampler and staleness
(``rollout_feed``) and the held-out evaluation (``evaluation``). Numbers against transformers in float64 on a tiny
Qwen3; a process group of one (gloo) where a phase needs one, two for context parallelism."""

import asyncio
import json
from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed
from megatron_bpd.gating import GateConfig
from megatron_bpd.rollout.types import TeacherScores, TrajectoryBatch
from megatron_bpd.train.rollout_data import MicroBatcher, RolloutData, micro_batch, padded_length

V, K = 300, 4


def small_data() -> RolloutData:
    traj = TrajectoryBatch(prompt_ids=[[1, 2, 3], [4, 5]], response_ids=[[6, 7], [8, 9, 10]],
                           behavior_logprobs=[[-0.5, -1.0], [-0.1, -0.2, -0.3]], loss_mask=[[1, 0], [1, 1, 1]],
                           finish_reason=["stop", "length"], weight_version=["3", "3"], prompt_index=[0, 1])
    teacher = TeacherScores([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0, -5.0])],
                            [torch.tensor([[6, 1], [7, 2]]), torch.tensor([[8, 0], [9, 0], [10, 0]])],
                            [torch.full((2, 2), -0.5), torch.full((3, 2), -0.7)])
    return RolloutData(traj, teacher)


def test_micro_batch_places_every_per_token_array_on_its_label_position():
    data = small_data()
    assert padded_length(data, [0, 1], 1) == 4 and padded_length(data, [0, 1], 3) == 6
    batch = micro_batch(data, [0, 1], 4, GateConfig(granularity="none"), pad_id=-1)
    assert batch.tokens.tolist() == [[1, 2, 3, 6], [4, 5, 8, 9]] and batch.labels.tolist() == [[2, 3, 6, 7],
                                                                                                [5, 8, 9, 10]]
    assert batch.loss_mask.tolist() == [[False, False, True, False], [False, True, True, True]]
    torch.testing.assert_close(batch.behavior_logprobs, torch.tensor([[0, 0, -0.5, -1.0], [0, -0.1, -0.2, -0.3]]))
    assert batch.teacher_logprobs.tolist() == [[0, 0, -1, -2], [0, -3, -4, -5]]
    response = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(batch.teacher_topk_ids[..., 0][response], batch.labels[response])  # top-1 = the label here
    assert batch.teacher_topk_ids.dtype == torch.int64 and batch.old_logprobs is None
    data.old_logprobs = {0: torch.tensor([-0.25, -0.75]), 1: torch.tensor([-1.0, -2.0, -3.0])}
    shorter = micro_batch(data, [1], 4, GateConfig(granularity="none"))
    assert shorter.old_logprobs.tolist() == [[0, -1, -2, -3]] and shorter.tokens.tolist() == [[4, 5, 8, 9]]
    with pytest.raises(ValueError, match="trajectory 1 has 4 label positions, micro-batch length 3"):
        micro_batch(data, [1], 3, GateConfig(granularity="none"))


def test_micro_batcher_takes_this_data_parallel_ranks_share():
    data = small_data()
    batcher = MicroBatcher(GateConfig(block_size=2), size=1, dp=(1, 2))
    mine, batches, seq_len = batcher(data, [0, 1])
    assert mine == [1] and seq_len == 4 and len(batches) == 1 and batches[0].tokens.tolist() == [[4, 5, 8, 9]]
    mine, batches, seq_len = MicroBatcher(GateConfig(block_size=2), size=2)(data, [0, 1])
    assert mine == [0, 1] and [b.tokens.shape[0] for b in batches] == [2]


def _cp_round_trip(rank, world_size):
    from megatron_bpd import parallel

    parallel.initialize(tp=1, cp=2, seed=0)
    data = small_data()
    batcher = MicroBatcher(GateConfig(block_size=2), size=1, cp=(rank, 2))
    mine, batches, seq_len = batcher(data, [0, 1])
    outputs = [{"lp": b.behavior_logprobs, "ids": b.teacher_topk_ids} for b in batches]
    return seq_len, [b.tokens.shape for b in batches], batcher.per_trajectory(data, mine, outputs, seq_len)


def test_micro_batches_split_for_context_parallelism_and_cut_back_to_trajectories():
    """CP 2: each rank holds half of every micro-batch (length padded to 2 x CP); cutting the outputs back gathers
    the halves into each trajectory's response arrays."""
    data = small_data()
    for seq_len, shapes, back in run_distributed(_cp_round_trip, 2):
        assert seq_len == 4 and shapes == [torch.Size([1, 2])] * 2
        for b in (0, 1):
            assert back[b]["lp"].tolist() == pytest.approx(data.trajectories.behavior_logprobs[b])
            assert torch.equal(back[b]["ids"], data.teacher.topk_ids[b])


# ------------------------------------------------------------------ passes and update on a tiny model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_bpd.models.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("phases"), layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16,
                           ffn=96, vocab=V, tied=False, seed=0)


def rollout():
    """Four trajectories of random tokens; one response token masked out; behavior log-probs set by the test."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, V, (n,), generator=g).tolist()  # noqa: E731
    prompts, responses = [ids(n) for n in (3, 5, 2, 4)], [ids(n) for n in (6, 3, 7, 5)]
    masks = [[0 if (b, t) == (0, 2) else 1 for t in range(len(r))] for b, r in enumerate(responses)]
    return TrajectoryBatch(prompts, responses, [[0.0] * len(r) for r in responses], masks, ["stop"] * 4, ["0"] * 4,
                           [0, 1, 2, 3])


def reference(hf_dir, traj):
    """transformers' float64 logits ``[T_b, V]`` at each trajectory's response positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for prompt, response in zip(traj.prompt_ids, traj.response_ids):
            logits = model(torch.tensor([prompt + response])).logits[0]
            out.append(logits[len(prompt) - 1:len(prompt) - 1 + len(response)])
    return out


def random_scores(traj, seed):
    g = torch.Generator().manual_seed(seed)
    n = [len(r) for r in traj.response_ids]
    return TeacherScores([-torch.rand(t, generator=g) * 6 for t in n],
                         [torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(t)]) for t in n],
                         [torch.log_softmax(torch.randn(t, K, generator=g), -1) for t in n])


def _phases_alone(rank, world_size, hf_dir, traj, probe, teacher, trace_path):
    import dataclasses

    from megatron_bpd import parallel
    from megatron_bpd.models.qwen3 import build_model, load_hf_weights
    from megatron_bpd.train.config import OptimizerSettings, load_config
    from megatron_bpd.train.gate_trace import GateTrace
    from megatron_bpd.train.metrics import MetricSums
    from megatron_bpd.train.passes import ROLLOUT_METRICS, ScoringPasses
    from megatron_bpd.train.setup import lr_scheduler, wrap_for_training
    from megatron_bpd.train.update import UPDATE_METRICS, Update

    parallel.initialize(tp=1, seed=0)
    model = build_model(hf_dir)
    load_hf_weights(model, hf_dir, progress=False)
    settings = OptimizerSettings(optimizer="sgd", lr=0.5, clip_grad=0.0)
    ddp, optimizer = wrap_for_training(model, settings)
    config = load_config(None, [f"teacher.top_k={K}", "reuse.micro_batch_size=2", "loss.gate.block_size=2"])
    loss_config = dataclasses.replace(config.loss, vocab_size=V)
    batcher = MicroBatcher(loss_config.gate, 2)
    passes = ScoringPasses(config, loss_config, ddp, model, batcher)  # the student is its own in-trainer teacher
    out, rows = {}, [0, 1, 2, 3]

    data = RolloutData(traj)
    out["teacher"] = passes.megatron_teacher_scores(data)
    sums = MetricSums()
    passes.old_logprobs(data, sums, step=0)
    out["old"], out["mismatch"] = data.old_logprobs, sums.reduce(ROLLOUT_METRICS)
    from_rollout = dataclasses.replace(config, reuse=dataclasses.replace(config.reuse, old_logprobs="rollout"))
    kept_behavior = RolloutData(traj)
    ScoringPasses(from_rollout, loss_config, ddp, None, batcher).old_logprobs(kept_behavior, MetricSums(), 0)
    out["rollout_old"] = kept_behavior.old_logprobs
    out["probe_kl"] = passes.probe_support_kl(traj, probe)

    entropy_filter = dataclasses.replace(loss_config, top_entropy_fraction=0.5)
    data.teacher = teacher
    mine, batches, seq_len = batcher(data, rows)
    normalizer, filtered, kept = ScoringPasses(config, entropy_filter, ddp, None, batcher).pre_pass(
        batches, data.num_tokens(rows), seq_len)
    out["entropy_kept"] = (normalizer, int(kept), batcher.per_trajectory(
        data, mine, [{"kept": b.train_mask.float()} for b in filtered], seq_len))

    before = [p.detach().clone() for p in model.parameters()]
    update = Update(config, loss_config, ddp, optimizer, lr_scheduler(optimizer, settings, 1), batcher, passes,
                    GateTrace(trace_path, 2, batcher))
    sums = MetricSums()
    update(data, rows, sums, (1, 0), step=5)
    out["update"] = sums.reduce(UPDATE_METRICS)
    out["moved"] = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    return out


@pytest.fixture(scope="module")
def phases(tiny, tmp_path_factory):
    traj = rollout()
    logits = reference(tiny, traj)
    lp = [torch.log_softmax(x, -1)[torch.arange(len(r)), r] for x, r in zip(logits, traj.response_ids)]
    traj.behavior_logprobs = [(x + 0.1).tolist() for x in lp]  # a sampler 0.1 nats off everywhere
    probe, teacher = random_scores(traj, 1), random_scores(traj, 2)
    trace = tmp_path_factory.mktemp("trace") / "gate_trace.jsonl"
    (out,) = run_distributed(_phases_alone, 1, tiny, traj, probe, teacher, trace)
    return SimpleNamespace(traj=traj, logits=logits, lp=lp, probe=probe, teacher=teacher, out=out, trace=trace)


def test_scoring_passes_give_transformers_log_probs_and_top_k(phases):
    out = phases.out
    for b, lp in enumerate(phases.lp):
        torch.testing.assert_close(out["old"][b].double(), lp, rtol=0, atol=2e-5)
        torch.testing.assert_close(out["teacher"].token_logprobs[b].double(), lp, rtol=0, atol=2e-5)
        values, ids = torch.log_softmax(phases.logits[b], -1).topk(K)
        assert torch.equal(out["teacher"].topk_ids[b], ids)
        torch.testing.assert_close(out["teacher"].topk_logprobs[b].double(), values, rtol=0, atol=2e-5)
        assert out["rollout_old"][b].tolist() == pytest.approx(phases.traj.behavior_logprobs[b])
    # recomputed pi_old against the sampler's log-probs: fresh samples, so the difference is the rollout/train mismatch
    assert out["mismatch"] == {"rollout_train_mismatch": pytest.approx(0.1, abs=2e-5)}


def test_support_kl_probe_is_the_token_weighted_kl_on_the_teachers_support(phases):
    from megatron_bpd.losses import topk_lsm_loss

    probe, traj = phases.probe, phases.traj
    student = torch.cat([x.gather(-1, ids) for x, ids in zip(phases.logits, probe.topk_ids)])
    mask = torch.tensor([m for ms in traj.loss_mask for m in ms], dtype=torch.bool)
    _, metrics = topk_lsm_loss(student, torch.cat(probe.topk_logprobs).double(), mask)
    assert phases.out["probe_kl"] == pytest.approx(metrics["support_kl"].item(), rel=1e-5)


def test_pre_pass_keeps_the_highest_entropy_half_of_the_mini_batch(phases):
    normalizer, kept, per_trajectory = phases.out["entropy_kept"]
    entropy = [-(torch.log_softmax(x, -1).exp() * torch.log_softmax(x, -1)).sum(-1) for x in phases.logits]
    valid = [(b, t) for b, ms in enumerate(phases.traj.loss_mask) for t, m in enumerate(ms) if m]
    ranked = sorted(valid, key=lambda bt: -entropy[bt[0]][bt[1]])
    expected = set(ranked[:round(0.5 * len(valid))])
    got = {(b, t) for b, arrays in per_trajectory.items() for t, k in enumerate(arrays["kept"].tolist()) if k}
    assert normalizer is None and kept == len(expected) and got == expected


def test_update_takes_one_step_with_the_loss_of_the_formula_and_traces_its_gates(phases):
    """Fresh pi_old (the pass's own log-probs): ratios and gates are 1 and the sampled-token loss is
    -mean_t clamp(lp_teach - lp_old, +-5) over the valid tokens."""
    mask = [torch.tensor(m, dtype=torch.bool) for m in phases.traj.loss_mask]
    advantage = torch.cat([(t.double() - lp).clamp(-5, 5)[m] for t, lp, m in
                           zip(phases.teacher.token_logprobs, phases.lp, mask)])
    record = phases.out["update"]
    assert record["loss"] == pytest.approx(-advantage.mean().item(), rel=1e-5)
    assert record["gate_mean"] == pytest.approx(1.0, abs=1e-5) and record["drift_abs_mean"] < 1e-5
    assert record["lr"] == 0.5 and record["grad_norm"] > 0 and phases.out["moved"] > 1e-4
    trace = [json.loads(line) for line in phases.trace.read_text().splitlines()]
    assert [(r["step"], r["epoch"], r["minibatch"], r["trajectory"]) for r in trace] == [(5, 1, 0, 0), (5, 1, 0, 1)]
    for r in trace:
        assert r["response_ids"] == phases.traj.response_ids[r["trajectory"]]
        assert r["gate"] == [1.0] * len(r["response_ids"]) and max(map(abs, r["drift"])) < 1e-4


# ------------------------------------------------------------------ sampling, staleness, evaluation

def test_the_sampler_seeds_each_step_and_scores_with_the_served_teacher(tmp_path):
    from megatron_bpd.rollout.client import ClientConfig, SGLangClient
    from megatron_bpd.rollout.embedded import EmbeddedServer
    from megatron_bpd.train.config import load_config
    from megatron_bpd.train.rollout_feed import Sampler
    from rollout_fixtures import make_tiny_qwen3

    class Unused:
        def __getattr__(self, name):
            raise AssertionError("the student's servers sample no teacher-policy rollout")

    overrides = ["rollout.samples_per_prompt=2", "rollout.max_new_tokens=5", "teacher.top_k=3", "seed=3"]
    student, teacher = (Sampler(load_config(None, overrides + [f"rollout.policy={p}"]), []) for p in ("student",
                                                                                                       "teacher"))
    prompts = [SimpleNamespace(token_ids=ids) for ids in ([5, 17, 42], [9, 9, 4, 8])]

    async def sample():
        with EmbeddedServer(make_tiny_qwen3(tmp_path / "model")) as server:
            async with SGLangClient(ClientConfig(urls=[server.url])) as client:
                return [await student(client, client, 0, prompts), await student(client, client, 0, prompts),
                        await student(client, None, 1, prompts), await teacher(Unused(), client, 0, prompts)]

    (first, scores), (again, _), (later, no_scores), (by_teacher, _) = asyncio.run(sample())
    assert first.prompt_ids == [[5, 17, 42]] * 2 + [[9, 9, 4, 8]] * 2
    assert all(1 <= len(r) <= 5 for r in first.response_ids) and no_scores is None
    assert again.response_ids == by_teacher.response_ids == first.response_ids  # seeded by the step
    assert later.response_ids != first.response_ids
    assert scores.top_k == 3 and [len(s) for s in scores.token_logprobs] == [len(r) for r in first.response_ids]


def test_staleness_is_measured_and_bounded():
    from megatron_bpd.train.rollout_feed import staleness

    assert staleness(["3", "2", "3"], 4, 2) == {"staleness_mean": pytest.approx(4 / 3), "staleness_max": 2}
    with pytest.raises(RuntimeError, match="step 4: a trajectory of weight version 1 is older than"):
        staleness(["1"], 4, 2)


def test_rollout_stats_count_lengths_and_solve_rates():
    from megatron_bpd.train.data import Prompt
    from megatron_bpd.train.evaluation import rollout_stats

    traj = TrajectoryBatch([[1], [1], [2]], [[7, 7], [8], [9, 9, 9]], [[0.0] * 2, [0.0], [0.0] * 3],
                           [[1] * 2, [1], [1] * 3], ["stop", "length", "abort"], ["0"] * 3, [0, 0, 1])
    prompts = [Prompt(0, [1], "7", "easy"), Prompt(1, [2], "8", "hard")]
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: str(ids[0]))
    stats = rollout_stats(prompts, traj, tokenizer, lambda text, answer: text == answer)
    assert stats == {"response_length": 2.0, "truncated_fraction": pytest.approx(1 / 3),
                     "aborted_fraction": pytest.approx(1 / 3), "solve_rate": pytest.approx(1 / 3),
                     "solve_rate_easy": 0.5, "solve_rate_hard": 0.0}
    assert "solve_rate" not in rollout_stats(prompts, traj, tokenizer, None)


def _evaluate_alone(rank, world_size, out):
    import torch.distributed as dist

    from megatron_bpd.train import evaluation
    from megatron_bpd.train.config import load_config

    dist.init_process_group("gloo")
    config = load_config(None, ["eval.samples=2", "eval.probe_prompts=1", "eval.probe_samples=3", "eval.seed=4"])
    calls = []

    async def policy(target, prompts, tokenizer, checker, max_new_tokens, samples, temperature, top_p, seed):
        calls.append((target, [p.token_ids for p in prompts], samples, seed))
        return {"n": len(prompts), "greedy": 0.5 if target == "student" else 1.0, "pass1": 0.25,
                "by_difficulty": {}}

    async def sample(client, teacher_client, prompt_ids, n_samples, seed):
        calls.append(("probe", client, teacher_client, prompt_ids, n_samples, seed))
        return "trajectories", "scores"

    evaluation.evaluate_policy = policy  # the servers' side is tested in test_evaluation.py
    feed = SimpleNamespace(call=lambda version, fn: asyncio.run(fn("student", "teacher")))
    passes = SimpleNamespace(probe_support_kl=lambda trajectories, scores: (trajectories, scores) and 0.125)
    prompts = [SimpleNamespace(token_ids=[i]) for i in range(3)]
    evaluate = evaluation.Evaluator(config, prompts, None, None, SimpleNamespace(sample=sample), passes, out)
    return evaluate(feed, 0, with_teacher=True), evaluate(feed, 2), calls


def test_evaluation_evaluates_student_teacher_and_probe_and_appends_evals_jsonl(tmp_path):
    (first, later, calls), = run_distributed(_evaluate_alone, 1, tmp_path)
    assert first == {"eval_greedy": 0.5, "eval_pass1": 0.25, "probe_support_kl": 0.125} == later
    assert calls[:3] == [("student", [[0], [1], [2]], 2, 4), ("teacher", [[0], [1], [2]], 2, 4),
                         ("probe", "student", "teacher", [[0]], 3, 4 + 7919)]
    assert [c[0] for c in calls[3:]] == ["student", "probe"]  # the teacher only once, at step 0
    evals = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and [e["support_kl"] for e in evals] == [0.125, 0.125]
    assert evals[0]["teacher"]["greedy"] == 1.0 and "teacher" not in evals[1]
