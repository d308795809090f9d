"""The no-grad forward passes of a step through Megatron's schedule (``scoring.forward_only``), each on the
vocab-parallel logits of the last pipeline stage:

- ``megatron_teacher_scores``: an in-trainer teacher's log-probs of the sampled tokens and its top-K;
- ``old_logprobs``: pi_old, the student's log-probs before the first update (or the rollout's, by
  ``reuse.old_logprobs``), with the rollout/train mismatch it shows;
- ``pre_pass``: what the loss needs of a whole mini-batch before its backward pass (the global gate normalizer,
  the top-entropy filter);
- ``probe_support_kl``: the evaluation's support-KL probe.

Per-trajectory results are CPU tensors like all of ``RolloutData``, on every last-stage rank.
"""

import dataclasses
from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from .. import parallel
from ..rollout.types import TeacherScores
from .config import TrainConfig
from .loss import LossConfig, top_entropy_filter
from .metrics import MetricSums
from .rollout_data import MicroBatcher, RolloutData
from .scoring import ScoringPass, forward_only, logprobs_pass, teacher_pass

ROLLOUT_METRICS = ["rollout_train_mismatch", "behavior_drift_abs_mean"]


class ScoringPasses:
    """The passes of a run: ``ddp`` is the student (Megatron DDP), ``teacher_model`` the in-trainer teacher (or
    None), ``micro_batches`` cuts trajectories into this rank's micro-batches. Collective over all ranks."""

    def __init__(self, config: TrainConfig, loss_config: LossConfig, ddp, teacher_model,
                 micro_batches: MicroBatcher):
        self.config, self.loss_config = config, loss_config
        self.ddp, self.teacher_model, self._micro_batches = ddp, teacher_model, micro_batches

    def _score(self, model, data: RolloutData, fn) -> Dict[int, Dict[str, torch.Tensor]]:
        """Per trajectory: ``fn``'s per-position outputs cut to the response (CPU tensors, like all of
        ``RolloutData``), every trajectory on every last-stage rank (each DP rank scores its share, then the shares
        are exchanged); other stages get {}."""
        rows = list(range(len(data.trajectories)))
        mine, batches, seq_len = self._micro_batches(data, rows)
        outputs = forward_only(model, batches, fn, seq_len)
        if not ps.is_pipeline_last_stage():
            return {}
        parts = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(parts, self._micro_batches.per_trajectory(data, mine, outputs, seq_len),
                               group=ps.get_data_parallel_group())
        return {b: s for part in parts for b, s in part.items()}

    def old_logprobs(self, data: RolloutData, sums: MetricSums, step: int) -> None:
        """Set ``data.old_logprobs`` (pi_old of step ``step``, on the last stage) and add the rollout/train mismatch
        or the drift since sampling (``ROLLOUT_METRICS``) to ``sums``."""
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
                    fresh = self.config.rollout.max_staleness == 0 or int(versions[b]) == step
                    sums.add("rollout_train_mismatch" if fresh else "behavior_drift_abs_mean",
                             (lp - behavior[b])[mask].abs().mean().item(), mask.sum().item())

    def megatron_teacher_scores(self, data: RolloutData) -> Optional[TeacherScores]:
        """The in-trainer teacher's log-probs of the sampled tokens and its top-K (on the last stage)."""
        scores = self._score(self.teacher_model, data, teacher_pass(self.loss_config, self.config.teacher.top_k))
        if not ps.is_pipeline_last_stage():
            return None
        n = len(data.trajectories)
        return TeacherScores([scores[b]["lp"] for b in range(n)], [scores[b]["ids"] for b in range(n)],
                             [scores[b]["top"] for b in range(n)])

    def pre_pass(self, batches, num_tokens, seq_len):
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

    def probe_support_kl(self, trajectories, scores) -> float:
        """Token-weighted mean reverse KL (student || teacher) on the teacher's top-K support over the probe."""
        data = RolloutData(trajectories, scores)
        _, batches, seq_len = self._micro_batches(data, list(range(len(trajectories))))

        def fn(head, batch):
            _, metrics = head.lsm_loss(batch.teacher_topk_ids, batch.teacher_topk_logprobs, batch.loss_mask)
            return {"kl": metrics["support_kl"], "n": batch.loss_mask.sum()}

        sums = MetricSums()
        outputs = forward_only(self.ddp, batches, ScoringPass(self.loss_config, fn), seq_len)  # TP/PP collectives
        if ps.get_tensor_model_parallel_rank() == 0:  # each (DP, CP) share of the positions counted once
            for out in outputs:
                sums.add("probe_support_kl", out["kl"].item(), out["n"].item())
        return sums.reduce(["probe_support_kl"]).get("probe_support_kl", float("nan"))

