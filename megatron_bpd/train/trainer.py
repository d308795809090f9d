"""The distillation loop. One step:

    prompts -> rollouts (n per prompt, SGLang protocol) -> teacher scores -> old log-probs
    -> for each reuse epoch and mini-batch: forward_backward_func with the gated loss -> optimizer step
    -> hand the weights to the rollout producer -> metrics (and a checkpoint every N steps).

The rollouts come from a producer (``rollout.producer``, through ``RolloutFeed``) that samples step s with the
weights of step max(s - k, first) (k = ``rollout.max_staleness``; 0: the synchronous loop) while the trainer trains;
rank 0 receives each rollout and broadcasts it; every rank builds the same micro-batches and takes its
data-parallel share. The loss runs on the last pipeline stage from vocab-parallel logits.
"""

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import parallel
from ..rollout.client import SGLangClient, gather_all
from ..rollout.producer import load_rollouts
from ..rollout.protocol import SamplingParams
from ..rollout.rollout import RolloutConfig, generate_rollout
from ..rollout.teacher import SGLangTeacher
from ..rollout.types import TeacherScores
from ..drift_controls import METRICS as DRIFT_CONTROL_METRICS
from .checkpoint import ROLLOUTS_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import PromptDataset
from .evaluation import evaluate_policy, flat_eval_metrics, solve_rate_by_difficulty
from .forward_step import make_forward_step
from .loss import m2po_batch_cutoff, top_entropy_filter
from .layout import check_layout
from .metrics import MetricSums, MetricsLog
from .rollout_data import RolloutData, micro_batch, newline_token_ids, padded_length, response_slices
from .rollout_feed import RolloutFeed, servers_from_config
from .scoring import ScoringPass, forward_only, gather_cp, logprobs_pass, teacher_pass
from .setup import lr_scheduler, wrap_for_training, zero_grads

UPDATE_METRICS = ["loss", "pg_clipfrac", "dual_clipfrac", "ratio_mean", "support_kl", "gate_mean", "gate_min",
                  "gate_max", "gate_std", "frac_gate_below_half", "drift_mean", "drift_abs_mean",
                  "segment_drift_abs_mean", *DRIFT_CONTROL_METRICS, "lr", "grad_norm"]
ROLLOUT_METRICS = ["rollout_train_mismatch", "behavior_drift_abs_mean"]


class Trainer:
    """``Trainer(config).run()``: the whole run on this rank (call under torchrun, or as one plain process)."""

    def __init__(self, config: TrainConfig):
        from transformers import AutoTokenizer

        from ..models.qwen3 import build_model, load_hf_weights
        from ..models.qwen3.checkpoint import load_megatron_checkpoint
        from ..models.qwen3.config import Qwen3Arch

        c = self.config = config
        parallel.initialize(tp=c.parallel.tp, pp=c.parallel.pp, cp=c.parallel.cp, seed=c.seed)
        self.rank, self.main = dist.get_rank(), dist.get_rank() == 0
        self.out = Path(c.out)
        self.out.mkdir(parents=True, exist_ok=True)
        check_layout(c, dist.get_world_size())  # batch sizes and model layout, as --dry-run checks them
        self.tokenizer = AutoTokenizer.from_pretrained(c.model.student)
        self.vocab_size = Qwen3Arch.from_hf(c.model.student).vocab_size
        self.loss_config = dataclasses.replace(c.loss, vocab_size=self.vocab_size)
        precision = {"bf16": True, "params_dtype": torch.bfloat16} if c.model.precision == "bf16" else {}
        self.model = build_model(c.model.student, **precision)
        if c.model.student_megatron_checkpoint:
            load_megatron_checkpoint(self.model, c.model.student_megatron_checkpoint)
        else:
            load_hf_weights(self.model, c.model.student, progress=self.main)
        self.ddp, self.optimizer = wrap_for_training(_mixed_precision(self.model), c.optimizer)
        self.teacher_model = None
        if c.teacher.source == "megatron":
            teacher = build_model(c.teacher.model, **precision)
            load_hf_weights(teacher, c.teacher.model, progress=self.main)
            self.teacher_model = _mixed_precision(teacher).eval()
        self.dataset = self._prompts(c.data.prompts, c.data.shuffle)
        self.eval_prompts = []
        if c.eval.every:
            self.eval_prompts = self._prompts(c.eval.prompts, False).prompts[:c.eval.limit or None]
        self.newline_ids = newline_token_ids(self.tokenizer) if c.loss.gate.granularity == "span" else []
        self.mask_ids = [self.tokenizer.convert_tokens_to_ids(t) for t in c.rollout.mask_special_tokens]
        self.checker = answer_checker(c.data.answer_checker)
        self.step, self.preloaded = 0, []
        resume = latest_checkpoint(c.checkpoint.dir) if c.checkpoint.resume else None
        if resume is not None:
            state = load_checkpoint(resume, self.ddp, self.optimizer)
            self.step = state["step"] + 1
            self.dataset.load_state(state["data"])
            self.preloaded = load_rollouts(resume / ROLLOUTS_FILE) if self.main else []
        updates_per_step = c.reuse.epochs * c.reuse.minibatches
        self.scheduler = lr_scheduler(self.optimizer, c.optimizer, c.steps * updates_per_step,
                                      self.step * updates_per_step)
        self.servers = servers_from_config(c, self.out) if self.main else None
        if self.main:
            print(f"[megatron-bpd] config:\n{c.describe()}" + (f"[megatron-bpd] resumed from {resume}\n" if resume
                                                               else ""), flush=True)

    def _prompts(self, path: str, shuffle: bool) -> PromptDataset:
        d = self.config.data
        return PromptDataset(path, self.tokenizer, d.prompt_template, d.apply_chat_template, d.max_prompt_len,
                             self.config.seed, shuffle, d.difficulty_key)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        c = self.config
        log = MetricsLog(self.out, c.steps, self.step) if self.main else None
        self.feed = RolloutFeed(c, self.dataset, self.servers, self._rollout, self.out / "weights", self.step,
                                self.preloaded)
        self.preloaded = []
        try:
            self._sync_weights(self.step)  # the servers start from the initial weights; a resumed run pushes its own
            if c.eval.every and self.step == 0:
                self.evaluate(0, with_teacher=True)
            while self.step < c.steps:
                record = self.train_step()
                done = self.step + 1
                if c.eval.every and (done % c.eval.every == 0 or done == c.steps):
                    record.update(self.evaluate(done))
                if log is not None:
                    log.write(record)
                every = c.checkpoint.every
                if c.checkpoint.dir and ((every and (self.step + 1) % every == 0) or self.step + 1 == c.steps):
                    save_checkpoint(c.checkpoint.dir, self.step, self.ddp, self.optimizer,
                                    {"data": self.feed.data_state(self.step + 1), "weight_version": self.step + 1},
                                    rollouts=self.feed.pending(self.step + 1) if self.main else None)
                self.step += 1
        finally:
            if log is not None:
                log.close()
            try:
                self.feed.close(self.step)
            finally:
                if self.servers is not None:
                    self.servers.stop()

    def train_step(self) -> dict:
        c, timings = self.config, {}
        clock = started = time.perf_counter()
        prompts, rollout = self.feed.next(self.step)
        trajectories = rollout.trajectories
        data = RolloutData(trajectories, rollout.teacher)
        timings["time_wait_rollout"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sums = MetricSums()
        if self.teacher_model is not None:
            data.teacher = self._megatron_teacher_scores(data)
        self._old_logprobs(data, sums)
        timings["time_score"] = time.perf_counter() - clock

        clock = time.perf_counter()
        order_rng = random.Random(c.seed * 100003 + self.step)
        for epoch in range(c.reuse.epochs):
            order = list(range(len(trajectories)))
            order_rng.shuffle(order)
            size = len(order) // c.reuse.minibatches
            for m in range(c.reuse.minibatches):
                self._update(data, sorted(order[m * size:(m + 1) * size]), sums, (epoch, m))
        timings["time_train"] = time.perf_counter() - clock

        clock = time.perf_counter()
        self._sync_weights(self.step + 1)
        timings["time_weight_sync"] = time.perf_counter() - clock

        record = {"step": self.step, **sums.reduce(UPDATE_METRICS + ROLLOUT_METRICS)}
        if "frac_gate_below_half" in record:
            record["gate_frac_below_half"] = record.pop("frac_gate_below_half")
        if self.main:
            record.update(self._rollout_stats(prompts, trajectories), **rollout.stats)
            if c.rollout.policy == "student":  # teacher samples (the control) have no student weight version
                record.update(staleness(trajectories.weight_version, self.step, c.rollout.max_staleness))
            train_tokens = sum(sum(m) for m in trajectories.loss_mask)
            record["tokens_per_s"] = train_tokens * c.reuse.epochs / max(timings["time_train"], 1e-9)
        record.update(timings, time_step=time.perf_counter() - started)
        return record

    # ------------------------------------------------------------------ phases

    async def _rollout(self, client: SGLangClient, teacher_client: Optional[SGLangClient], step: int, prompts):
        """Step ``step``'s trajectories (n samples of each prompt, seeded by the step) and the served teacher's
        scores (runs in the rollout producer's thread)."""
        c = self.config.rollout
        config = RolloutConfig(
            n_samples=c.samples_per_prompt,
            sampling=self._sampling(), seed=self.config.seed * 1000003 + step * 10007, mask_token_ids=self.mask_ids)
        sampler = teacher_client if self.config.rollout.policy == "teacher" else client
        trajectories = await generate_rollout(sampler, [p.token_ids for p in prompts], config)
        scores = None
        if teacher_client is not None:
            scores = await SGLangTeacher(teacher_client, self.config.teacher.top_k).score(trajectories)
        return trajectories, scores

    def _sampling(self) -> SamplingParams:
        """The rollout's sampling settings (training rollouts and the support-KL probe sample alike)."""
        c = self.config.rollout
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens,
                              stop_token_ids=list(c.stop_token_ids) or None)

    def _micro_batches(self, data: RolloutData, rows: List[int], with_old: bool = True):
        """(this DP rank's CP-split micro-batches of ``rows`` on the compute device, padded length)."""
        c = self.config
        multiple = 2 * c.parallel.cp if c.parallel.cp > 1 else 1
        seq_len = padded_length(data, rows, multiple)
        mine = rows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
        size = c.reuse.micro_batch_size
        device = parallel.compute_device()
        batches = [micro_batch(data, mine[i:i + size], seq_len, self.loss_config.gate, pad_id=self._pad_id(),
                               newline_ids=self.newline_ids, with_old=with_old,
                               with_behavior=with_old and self.loss_config.drift_control.kind != "none")
                   .split_for_cp(c.parallel.cp, ps.get_context_parallel_rank()).to(device)
                   for i in range(0, len(mine), size)]
        return mine, batches, seq_len

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _score(self, model, data: RolloutData, fn) -> Dict[int, Dict[str, torch.Tensor]]:
        """Per trajectory: ``fn``'s per-position outputs cut to the response (CPU tensors, like all of
        ``RolloutData``), every trajectory on every last-stage rank (each DP rank scores its share, then the shares
        are exchanged); other stages get {}."""
        rows = list(range(len(data.trajectories)))
        mine, batches, seq_len = self._micro_batches(data, rows, with_old=False)
        outputs = forward_only(model, batches, fn, seq_len)
        if not ps.is_pipeline_last_stage():
            return {}
        parts = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, self._per_trajectory(data, mine, outputs, seq_len),
                               group=ps.get_data_parallel_group())
        return {b: s for part in parts for b, s in part.items()}

    def _per_trajectory(self, data: RolloutData, mine: List[int], outputs: List[dict], seq_len: int,
                        keys=None, wanted=lambda b: True) -> Dict[int, Dict[str, torch.Tensor]]:
        """This DP rank's per-micro-batch outputs ``[b, s/cp, ...]`` (the ``keys`` of them, default all) cut into
        per-trajectory response arrays (CPU) of the trajectories ``wanted``: {trajectory: {key: [T_b, ...]}}.
        Every CP rank of the last stage calls it (the CP shares are gathered)."""
        size = self.config.reuse.micro_batch_size
        result = {}
        for i, out in enumerate(outputs):
            chunk = mine[i * size:(i + 1) * size]
            for key in (keys or out.keys()):
                for b, piece in zip(chunk, response_slices(data, chunk, gather_cp(out[key], seq_len))):
                    if wanted(b):
                        result.setdefault(b, {})[key] = piece.cpu()
        return result

    def _trace_gates(self, data: RolloutData, mine: List[int], outputs: List[dict], seq_len: int, update) -> None:
        """Append the per-position drift and gates (and the response's token ids, for drift by line) of this
        update's trajectories among the step's first ``gate_trace`` to ``gate_trace.jsonl`` (collective over all
        ranks; rank 0 writes)."""
        local = {}
        if ps.is_pipeline_last_stage():
            local = self._per_trajectory(data, mine, outputs, seq_len, ("drift", "gates"),
                                         lambda b: b < self.config.gate_trace)
            if ps.get_tensor_model_parallel_rank() != 0 or ps.get_context_parallel_rank() != 0:
                local = {}
        parts = [None] * dist.get_world_size() if self.main else None
        dist.gather_object(local, parts, dst=0)
        if not self.main:
            return
        rounded = lambda t: [round(v, 5) + 0.0 for v in t.tolist()]  # noqa: E731 (+ 0.0: no -0.0)
        with open(self.out / "gate_trace.jsonl", "a") as f:
            for b, values in sorted((b, v) for part in parts for b, v in part.items()):
                f.write(json.dumps({"step": self.step, "epoch": update[0], "minibatch": update[1], "trajectory": b,
                                    "drift": rounded(values["drift"]), "gate": rounded(values["gates"]),
                                    "response_ids": list(data.trajectories.response_ids[b])}) + "\n")

    def _old_logprobs(self, data: RolloutData, sums: MetricSums) -> None:
        behavior = {b: torch.tensor(lp) for b, lp in enumerate(data.trajectories.behavior_logprobs)}
        if self.config.reuse.old_logprobs == "rollout":
            data.old_logprobs = behavior
            return
        scores = self._score(self.ddp, data, logprobs_pass(self.loss_config, self.config.rollout.temperature))
        data.old_logprobs = {b: s["lp"] for b, s in scores.items()}
        on_policy = self.config.rollout.policy == "student"  # else the behavior log-probs are the teacher's
        if on_policy and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0:
            versions = data.trajectories.weight_version
            for b, lp in data.old_logprobs.items():
                mask = data.response_mask(b)
                if mask.any():
                    # sampled with these weights: any difference is a rollout/train mismatch; sampled k versions
                    # back (overlapped rollouts): it is the drift since sampling, which this mode does not gate
                    fresh = self.config.rollout.max_staleness == 0 or int(versions[b]) == self.step
                    sums.add("rollout_train_mismatch" if fresh else "behavior_drift_abs_mean",
                             (lp - behavior[b])[mask].abs().mean().item(), mask.sum().item())

    def _megatron_teacher_scores(self, data: RolloutData) -> Optional[TeacherScores]:
        """The in-trainer teacher's log-probs of the sampled tokens and its top-K (on the last stage)."""
        scores = self._score(self.teacher_model, data, teacher_pass(self.loss_config, self.config.teacher.top_k))
        if not ps.is_pipeline_last_stage():
            return None
        n = len(data.trajectories)
        return TeacherScores([scores[b]["lp"] for b in range(n)], [scores[b]["ids"] for b in range(n)],
                             [scores[b]["top"] for b in range(n)])

    def _update(self, data: RolloutData, rows: List[int], sums: MetricSums, update=(0, 0)) -> None:
        """One optimizer step on the trajectories ``rows``, mini-batch ``update`` = (epoch, index) of the reuse
        schedule."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if data.teacher is None and ps.is_pipeline_last_stage():
            raise ValueError("no teacher scores: teacher.source must be 'sglang' or 'megatron'")
        mine, batches, seq_len = self._micro_batches(data, rows, with_old=ps.is_pipeline_last_stage())
        normalizer, batches, num_tokens = self._pre_pass(batches, data.num_tokens(rows), seq_len)
        m2_cutoff = None
        if self.loss_config.drift_control.kind == "m2po" and ps.is_pipeline_last_stage():
            m2_cutoff = m2po_batch_cutoff(batches, self.loss_config.drift_control,
                                          ps.get_data_parallel_group(with_context_parallel=True))
        zero_grads(self.ddp, self.optimizer)
        forward_step = make_forward_step(self.loss_config, num_tokens, len(batches), normalizer, m2_cutoff)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[self.ddp],
            num_microbatches=len(batches), seq_length=seq_len, micro_batch_size=self.config.reuse.micro_batch_size,
            forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        update_ok, grad_norm, _ = self.optimizer.step()
        if not update_ok:
            raise FloatingPointError(f"step {self.step}: the optimizer skipped the update (non-finite gradients)")
        self.scheduler.step(1)
        if self.config.gate_trace:
            self._trace_gates(data, mine, outputs, seq_len, update)
        if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0:
            return
        loss = sum(o["loss"].item() for o in outputs)
        if ps.get_context_parallel_rank() == 0:
            sums.add("grad_norm", float(grad_norm or 0.0), 1.0 / ps.get_data_parallel_world_size())
            sums.add("lr", float(lr), 1.0 / ps.get_data_parallel_world_size())
            for out, batch in zip(outputs, batches):
                trained = batch.loss_mask if batch.train_mask is None else batch.train_mask
                for key in UPDATE_METRICS[1:-1]:
                    if key in out:
                        sums.add(key, out[key].item(), float(trained.sum()))
        # The update's loss is the sum over micro-batches, DP and CP ranks; with weight 1/(DP*CP) per rank the mean
        # over updates of these sums comes out of the weighted mean.
        shares = ps.get_data_parallel_world_size() * ps.get_context_parallel_world_size()
        sums.add("loss", loss * shares, 1.0 / shares)

    def _pre_pass(self, batches, num_tokens, seq_len):
        """What the loss needs of the whole mini-batch before the backward pass, from one no-grad forward of every
        micro-batch: the gate normalizer terms (scope "global", summed over micro-batches and DP ranks) and the
        top-entropy filter (``loss.top_entropy_fraction`` < 1). Returns (normalizer or None, batches, num_tokens)."""
        from ..gating import gates_for_segments
        from ..parallel.context_parallel import group_sum

        config = self.loss_config
        terms_wanted, entropy_wanted = config.gate.scope == "global", config.top_entropy_fraction < 1
        if not (terms_wanted or entropy_wanted):
            return None, batches, num_tokens
        cp_group = ps.get_context_parallel_group()
        raw = dataclasses.replace(config.gate, normalize=False)

        def fn(head, batch):
            out = {}
            if terms_wanted:
                cur = head.logprobs(batch.labels, config.temperature)
                _, stats = gates_for_segments(cur, batch.old_logprobs, batch.loss_mask, batch.segment_ids, batch.plan,
                                              raw, reduce=group_sum(cp_group))
                out["terms"] = stats["normalizer_terms"]
            if entropy_wanted:
                out["entropy"] = head.entropy(config.temperature)
            return out

        outputs = forward_only(self.ddp, batches, ScoringPass(config, fn), seq_len)
        normalizer = None
        if terms_wanted:
            normalizer = torch.zeros(2, dtype=torch.float64, device=parallel.compute_device())
            for out in outputs:
                normalizer += out["terms"]
            dist.all_reduce(normalizer, group=ps.get_data_parallel_group())
        if entropy_wanted and ps.is_pipeline_last_stage():
            batches, num_tokens = top_entropy_filter(batches, [o["entropy"] for o in outputs],
                                                     config.top_entropy_fraction,
                                                     ps.get_data_parallel_group(with_context_parallel=True))
        return normalizer, batches, num_tokens

    def _sync_weights(self, version: int) -> None:
        """Gather the full weights (a collective over each model-parallel group) and hand a CPU copy to the rollout
        producer as ``version`` (the weights of step ``version``)."""
        from ..models.qwen3 import iter_hf_weights

        weights = [(name, tensor.detach().cpu().clone()) if self.main else None
                   for name, tensor in iter_hf_weights(self.model)]
        if self.main:
            self.feed.push(version, weights)

    # ------------------------------------------------------------------ held-out evaluation

    def evaluate(self, done: int, with_teacher: bool = False) -> dict:
        """Held-out greedy accuracy / pass@1 of the current weights (on the servers) and the support-KL probe (see
        ``evaluation``) after ``done`` training steps; appended to ``evals.jsonl``; returns the flat scalars."""
        result, probe = None, [None]
        if self.main:  # on servers holding the trainer's current weights (version ``done``)
            result, probe[0] = self.feed.call(done, lambda client, teacher: self._evaluate_async(client, teacher,
                                                                                                with_teacher))
        dist.broadcast_object_list(probe, src=0)
        support_kl = self._probe_support_kl(*probe[0]) if probe[0] is not None else None
        if not self.main:
            return {}
        result["step"] = done
        if support_kl is not None:
            result["support_kl"] = support_kl
        with open(self.out / "evals.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        flat = flat_eval_metrics(result["student"])
        if support_kl is not None:
            flat["probe_support_kl"] = support_kl
        return flat

    async def _evaluate_async(self, client, teacher_client, with_teacher: bool):
        c, r = self.config, self.config.rollout
        run = lambda target: evaluate_policy(target, self.eval_prompts, self.tokenizer, self.checker,  # noqa: E731
                                             r.max_new_tokens, c.eval.samples, r.temperature, r.top_p, c.eval.seed)

        async def probe():
            prompts = [p.token_ids for p in self.eval_prompts[:c.eval.probe_prompts]]
            config = RolloutConfig(n_samples=c.eval.probe_samples, seed=c.eval.seed + 7919,
                                   mask_token_ids=self.mask_ids, sampling=self._sampling())
            trajectories = await generate_rollout(client, prompts, config)
            return trajectories, await SGLangTeacher(teacher_client, c.teacher.top_k).score(trajectories)

        async def nothing():
            return None
        # the student's and the teacher's evaluations and the probe run side by side: all their requests in flight
        student, teacher, probed = await gather_all([
            run(client), run(teacher_client) if with_teacher and teacher_client is not None else nothing(),
            probe() if c.eval.probe_prompts and teacher_client is not None else nothing()])
        return {"student": student} | ({"teacher": teacher} if teacher is not None else {}), probed

    def _probe_support_kl(self, trajectories, scores) -> float:
        """Token-weighted mean reverse KL (student || teacher) on the teacher's top-K support over the probe."""
        data = RolloutData(trajectories, scores)
        _, batches, seq_len = self._micro_batches(data, list(range(len(trajectories))), with_old=False)

        def fn(head, batch):
            _, metrics = head.lsm_loss(batch.teacher_topk_ids, batch.teacher_topk_logprobs, batch.loss_mask)
            return {"kl": metrics["support_kl"], "n": batch.loss_mask.sum()}

        sums = MetricSums()
        outputs = forward_only(self.ddp, batches, ScoringPass(self.loss_config, fn), seq_len)  # TP/PP collectives
        if ps.get_tensor_model_parallel_rank() == 0:  # each (DP, CP) share of the positions counted once
            for out in outputs:
                sums.add("probe_support_kl", out["kl"].item(), out["n"].item())
        return sums.reduce(["probe_support_kl"]).get("probe_support_kl", float("nan"))

    def _rollout_stats(self, prompts, trajectories) -> dict:
        lengths = [len(r) for r in trajectories.response_ids]
        stats = {"response_length": sum(lengths) / max(len(lengths), 1),
                 "truncated_fraction": sum(f == "length" for f in trajectories.finish_reason) / len(lengths),
                 "aborted_fraction": sum(f == "abort" for f in trajectories.finish_reason) / len(lengths)}
        if self.checker is not None:
            answers = [prompts[i].answer for i in trajectories.prompt_index]
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in trajectories.response_ids]
            scored = [(self.checker(t, a), prompts[i].difficulty)
                      for t, a, i in zip(texts, answers, trajectories.prompt_index) if a is not None]
            stats["solve_rate"] = sum(ok for ok, _ in scored) / len(scored) if scored else float("nan")
            stats.update(solve_rate_by_difficulty(*zip(*scored)) if scored else {})
        return stats


def _mixed_precision(model):
    """bf16 models run inside Megatron's Float16Module (bf16 activations, float32 logits on the last stage)."""
    if not model.config.bf16:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


def answer_checker(name: str):
    """``check(response_text, answer) -> bool`` by name (``DataSettings.answer_checker``, validated there): "math"
    (math-verify on the last \\boxed{}), a synthetic task's name or "arithmetic" (their exact answer-line
    checker), or "none"."""
    if name == "none":
        return None
    if name == "math":
        from ..eval.answers import is_correct

        return is_correct
    from ..tasks.common import check

    return check


def staleness(versions, step: int, max_staleness: int) -> dict:
    """staleness_mean / staleness_max of a step's trajectories: step - the weight version that sampled each one.
    More than ``max_staleness`` is a bug of the producer, never trained on."""
    ages = [step - int(v) for v in versions]
    if ages and max(ages) > max_staleness:
        raise RuntimeError(f"step {step}: a trajectory of weight version {step - max(ages)} is older than "
                           f"rollout.max_staleness={max_staleness}")
    return {"staleness_mean": sum(ages) / max(len(ages), 1), "staleness_max": max(ages, default=0)}
