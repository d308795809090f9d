"""One optimizer step of the reuse schedule: this rank's micro-batches of a mini-batch, the pre-pass the loss needs
of the whole mini-batch, Megatron's forward_backward_func with the gated loss (``forward_step``), the optimizer and
learning-rate steps, the gate trace, and the update's metrics (``UPDATE_METRICS``, weighted sums)."""

from typing import List, Optional

from megatron.core import parallel_state as ps

from ..drift_controls import METRICS as DRIFT_CONTROL_METRICS
from .config import TrainConfig
from .forward_step import make_forward_step
from .gate_trace import GateTrace
from .loss import LossConfig, m2po_batch_cutoff
from .metrics import MetricSums
from .passes import ScoringPasses
from .rollout_data import MicroBatcher, RolloutData
from .setup import zero_grads

UPDATE_METRICS = ["loss", "pg_clipfrac", "dual_clipfrac", "ratio_mean", "support_kl", "gate_mean", "gate_min",
                  "gate_max", "gate_std", "frac_gate_below_half", "drift_mean", "drift_abs_mean",
                  "segment_drift_abs_mean", *DRIFT_CONTROL_METRICS, "lr", "grad_norm"]


class Update:
    """``update(data, rows, sums, (epoch, index), step)``: one optimizer step of ``ddp`` (Megatron DDP) with
    ``optimizer`` and ``scheduler`` on the trajectories ``rows`` of ``data``. Collective over all ranks."""

    def __init__(self, config: TrainConfig, loss_config: LossConfig, ddp, optimizer, scheduler,
                 micro_batches: MicroBatcher, passes: ScoringPasses, gate_trace: Optional[GateTrace] = None):
        self.config, self.loss_config, self.ddp, self.optimizer, self.scheduler = (config, loss_config, ddp,
                                                                                   optimizer, scheduler)
        self._micro_batches, self.passes, self.gate_trace = micro_batches, passes, gate_trace

    def __call__(self, data: RolloutData, rows: List[int], sums: MetricSums, update=(0, 0), step: int = 0) -> None:
        """One optimizer step on the trajectories ``rows``, mini-batch ``update`` = (epoch, index) of step ``step``'s
        reuse schedule; adds its metrics to ``sums``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if data.teacher is None and ps.is_pipeline_last_stage():
            raise ValueError("no teacher scores: teacher.source must be 'sglang' or 'megatron'")
        mine, batches, seq_len = self._micro_batches(data, rows)
        normalizer, batches, num_tokens = self.passes.pre_pass(batches, data.num_tokens(rows), seq_len)
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
            raise FloatingPointError(f"step {step}: the optimizer skipped the update (non-finite gradients)")
        self.scheduler.step(1)
        if self.gate_trace is not None:
            self.gate_trace.write(step, update, data, mine, outputs, seq_len)
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

