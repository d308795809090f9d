"""Checks of a run's parallel layout and batch sizes that need no process group (``--dry-run``)."""

from ..models.qwen3.config import Qwen3Arch
from .config import TrainConfig


def check_layout(config: TrainConfig, world_size: int) -> str:
    """Validate ``config`` for ``world_size`` processes; returns a one-paragraph description, raises ValueError."""
    p = config.parallel
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by TP x PP x CP = {p.tp} x {p.pp} x {p.cp}")
    dp = world_size // model_parallel
    arch = Qwen3Arch.from_hf(config.model.student)
    arch.check_layout(p.tp, p.pp)
    if config.teacher.source == "megatron":
        Qwen3Arch.from_hf(config.teacher.model).check_layout(p.tp, p.pp)
    r, u = config.rollout, config.reuse
    trajectories = r.prompts_per_step * r.samples_per_prompt
    per_update = u.minibatches * dp * u.micro_batch_size
    if trajectories % per_update:
        raise ValueError(f"{trajectories} trajectories per step must be divisible by reuse.minibatches x DP x "
                         f"micro_batch_size = {u.minibatches} x {dp} x {u.micro_batch_size}")
    micro_batches = trajectories // per_update
    return (f"layout: world {world_size} = TP {p.tp} x PP {p.pp} x CP {p.cp} x DP {dp}; student "
            f"{arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size} (padded "
            f"{arch.padded_vocab_size(p.tp, 128)}); {trajectories} trajectories per step -> "
            f"{u.epochs} epochs x {u.minibatches} optimizer steps of {micro_batches} micro-batches of "
            f"{u.micro_batch_size} per DP rank; loss {config.loss.kind}, gate {config.loss.gate.granularity}")
