"""The distillation loop: setup, then per step a short sequence of phases, each in a module of its own:

    rollout          ``rollout_feed``  the step's prompts -> n rollouts each and the served teacher's scores
    scoring passes   ``passes``        the in-trainer teacher's scores, pi_old (no-grad forwards)
    updates          ``update``        for each mini-batch of the reuse schedule (``rollout.reuse``): micro-batches
                                       (``rollout_data``), Megatron's forward_backward_func with the gated loss,
                                       the optimizer step, the gate trace (``gate_trace``)
    weight sync      ``rollout_feed``  the new weights to the rollout producer
    metrics          ``metrics``       reduced over ranks, with the rollout's statistics (``evaluation``)

and every ``eval.every`` steps the held-out evaluation (``evaluation``), every ``checkpoint.every`` a checkpoint.

The rollouts come from a producer (``rollout.producer``, through ``RolloutFeed``) that samples step s with the
weights of step max(s - k, first) (k = ``rollout.max_staleness``; 0: the synchronous loop) while the trainer trains;
rank 0 receives each rollout and broadcasts it; every rank builds the same micro-batches and takes its
data-parallel share. The loss runs on the last pipeline stage from the LM head (``forward_step.head_forward``: the
vocab-parallel logits, or the hidden states and the output weight shard with ``loss.fused_head``).
"""

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import parallel
from ..rollout.producer import load_rollouts
from ..rollout.reuse import reuse_schedule
from .checkpoint import ROLLOUTS_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import PromptDataset
from .evaluation import Evaluator, answer_checker, rollout_stats
from .gate_trace import GateTrace
from .layout import check_layout
from .metrics import MetricSums, MetricsLog
from .passes import ROLLOUT_METRICS, ScoringPasses
from .rollout_data import MicroBatcher, RolloutData, newline_token_ids
from .rollout_feed import RolloutFeed, Sampler, servers_from_config, staleness
from .setup import lr_scheduler, mixed_precision, wrap_for_training
from .update import UPDATE_METRICS, Update


class Trainer:
    """``Trainer(config).run()``: the whole run on this rank (call under torchrun, or as one plain process). Its
    phases are attributes: ``sample`` (the producer's sampler), ``passes``, ``update``, ``evaluate``."""

    def __init__(self, config: TrainConfig):
        from transformers import AutoTokenizer

        from ..models.qwen3 import build_model, load_hf_weights
        from ..models.qwen3.checkpoint import load_megatron_checkpoint
        from ..models.qwen3.config import Qwen3Arch

        c = self.config = config
        parallel.initialize(tp=c.parallel.tp, pp=c.parallel.pp, cp=c.parallel.cp, seed=c.seed)
        self.main = dist.get_rank() == 0
        self.out = Path(c.out)
        self.out.mkdir(parents=True, exist_ok=True)
        check_layout(c, dist.get_world_size())  # batch sizes and model layout, as --dry-run checks them
        self.tokenizer = AutoTokenizer.from_pretrained(c.model.student)
        self.loss_config = dataclasses.replace(c.loss, vocab_size=Qwen3Arch.from_hf(c.model.student).vocab_size)
        precision = {"bf16": True, "params_dtype": torch.bfloat16} if c.model.precision == "bf16" else {}
        self.model = build_model(c.model.student, **precision)
        if c.model.student_megatron_checkpoint:
            load_megatron_checkpoint(self.model, c.model.student_megatron_checkpoint)
        else:
            load_hf_weights(self.model, c.model.student, progress=self.main)
        self.ddp, self.optimizer = wrap_for_training(mixed_precision(self.model), c.optimizer)
        self.teacher_model = None
        if c.teacher.source == "megatron":
            teacher = build_model(c.teacher.model, **precision)
            load_hf_weights(teacher, c.teacher.model, progress=self.main)
            self.teacher_model = mixed_precision(teacher).eval()
        self.dataset = self._prompts(c.data.prompts, c.data.shuffle)
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
        self._phases()
        if self.main:
            print(f"[megatron-bpd] config:\n{c.describe()}" + (f"[megatron-bpd] resumed from {resume}\n" if resume
                                                               else ""), flush=True)

    def _phases(self) -> None:
        """Build the step's phases once, on this rank's share of the layout."""
        c, tokenizer = self.config, self.tokenizer
        newline_ids = newline_token_ids(tokenizer) if c.loss.gate.granularity == "span" else []
        self.micro_batches = MicroBatcher(
            self.loss_config.gate, c.reuse.micro_batch_size,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, newline_ids,
            dp=(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            cp=(ps.get_context_parallel_rank(), c.parallel.cp), device=parallel.compute_device())
        self.sample = Sampler(c, [tokenizer.convert_tokens_to_ids(t) for t in c.rollout.mask_special_tokens])
        self.passes = ScoringPasses(c, self.loss_config, self.ddp, self.teacher_model, self.micro_batches)
        trace = GateTrace(self.out / "gate_trace.jsonl", c.gate_trace, self.micro_batches) if c.gate_trace else None
        self.update = Update(c, self.loss_config, self.ddp, self.optimizer, self.scheduler, self.micro_batches,
                             self.passes, trace)
        self.checker = answer_checker(c.data.answer_checker)
        eval_prompts = self._prompts(c.eval.prompts, False).prompts[:c.eval.limit or None] if c.eval.every else []
        self.evaluate = Evaluator(c, eval_prompts, tokenizer, self.checker, self.sample, self.passes, self.out)

    def _prompts(self, path: str, shuffle: bool) -> PromptDataset:
        d = self.config.data
        return PromptDataset(path, self.tokenizer, d.prompt_template, d.apply_chat_template, d.max_prompt_len,
                             self.config.seed, shuffle, d.difficulty_key)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        c = self.config
        log = MetricsLog(self.out, c.steps, self.step) if self.main else None
        self.feed = RolloutFeed(c, self.dataset, self.servers, self.sample, self.out / "weights", self.step,
                                self.preloaded)
        self.preloaded = []
        try:
            # the servers start from the initial weights; a resumed run pushes its own
            self.feed.sync_weights(self.step, self.model)
            if c.eval.every and self.step == 0:
                self.evaluate(self.feed, 0, with_teacher=True)
            while self.step < c.steps:
                record = self.train_step()
                done = self.step + 1
                if c.eval.every and (done % c.eval.every == 0 or done == c.steps):
                    record.update(self.evaluate(self.feed, done))
                if log is not None:
                    log.write(record)
                every = c.checkpoint.every
                if c.checkpoint.dir and ((every and done % every == 0) or done == c.steps):
                    save_checkpoint(c.checkpoint.dir, self.step, self.ddp, self.optimizer,
                                    {"data": self.feed.data_state(done), "weight_version": done},
                                    rollouts=self.feed.pending(done) if self.main else None)
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
        """One step of the phases; returns its metrics record."""
        c, timings = self.config, {}
        clock = started = time.perf_counter()
        prompts, rollout = self.feed.next(self.step)
        trajectories = rollout.trajectories
        data = RolloutData(trajectories, rollout.teacher)
        timings["time_wait_rollout"] = time.perf_counter() - clock

        clock = time.perf_counter()
        sums = MetricSums()
        if self.teacher_model is not None:
            data.teacher = self.passes.megatron_teacher_scores(data)
        self.passes.old_logprobs(data, sums, self.step)
        timings["time_score"] = time.perf_counter() - clock

        clock = time.perf_counter()
        for minibatch in reuse_schedule(len(trajectories), c.reuse.epochs, c.reuse.minibatches,
                                        c.seed * 100003 + self.step):
            self.update(data, minibatch.rows, sums, (minibatch.epoch, minibatch.index), self.step)
        timings["time_train"] = time.perf_counter() - clock

        clock = time.perf_counter()
        self.feed.sync_weights(self.step + 1, self.model)
        timings["time_weight_sync"] = time.perf_counter() - clock

        record = {"step": self.step, **sums.reduce(UPDATE_METRICS + ROLLOUT_METRICS)}
        if "frac_gate_below_half" in record:
            record["gate_frac_below_half"] = record.pop("frac_gate_below_half")
        if self.main:
            record.update(rollout_stats(prompts, trajectories, self.tokenizer, self.checker), **rollout.stats)
            if c.rollout.policy == "student":  # teacher samples (the control) have no student weight version
                record.update(staleness(trajectories.weight_version, self.step, c.rollout.max_staleness))
            train_tokens = sum(sum(m) for m in trajectories.loss_mask)
            record["tokens_per_s"] = train_tokens * c.reuse.epochs / max(timings["time_train"], 1e-9)
        record.update(timings, time_step=time.perf_counter() - started)
        return record
