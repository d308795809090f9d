"""Checks of a run's parallel layout and batch sizes that need no process group (``--dry-run``).

A model path that does not exist on this machine (a cluster path in an example config) is resolved by the Qwen3
size in its name (``/models/Qwen3-1.7B-Base`` -> the 1.7B architecture), so configs can be checked anywhere.
"""

import re
from pathlib import Path

from ..models.qwen3.config import SIZES, Qwen3Arch, qwen3_hf_config
from .config import TrainConfig


def model_arch(path: str) -> Qwen3Arch:
    if Path(path).exists():
        return Qwen3Arch.from_hf(path)
    match = re.search(r"Qwen3-(\d+(?:\.\d+)?B)", path)
    if match is None or match.group(1) not in SIZES:
        raise FileNotFoundError(f"model {path!r} does not exist here and names no Qwen3 size ({', '.join(SIZES)})")
    return Qwen3Arch.from_hf(qwen3_hf_config(match.group(1)))


def rank_groups(tp: int, pp: int, cp: int, dp: int) -> dict:
    """Megatron-Core's rank groups of the layout (its own RankGenerator, default order tp-cp-ep-dp-pp)."""
    from megatron.core.parallel_state import RankGenerator

    generator = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    return {name: generator.get_ranks(name) for name in ("tp", "cp", "dp", "pp")}


def check_layout(config: TrainConfig, world_size: int) -> str:
    """Validate ``config`` for ``world_size`` processes; returns a description, raises ValueError."""
    p, control = config.parallel, config.loss.drift_control
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by TP x PP x CP = {p.tp} x {p.pp} x {p.cp}")
    dp = world_size // model_parallel
    arch = model_arch(config.model.student)
    arch.check_layout(p.tp, p.pp)
    if config.teacher.source == "megatron":
        model_arch(config.teacher.model).check_layout(p.tp, p.pp)
    r, u = config.rollout, config.reuse
    trajectories = r.prompts_per_step * r.samples_per_prompt
    per_update = u.minibatches * dp * u.micro_batch_size
    if trajectories % per_update:
        raise ValueError(f"{trajectories} trajectories per step must be divisible by reuse.minibatches x DP x "
                         f"micro_batch_size = {u.minibatches} x {dp} x {u.micro_batch_size}")
    groups = rank_groups(p.tp, p.pp, p.cp, dp)
    lines = [f"layout: world {world_size} = TP {p.tp} x CP {p.cp} x DP {dp} x PP {p.pp}",
             *(f"  {name.upper()} groups: {ranks}" for name, ranks in groups.items()),
             f"student: {arch.num_layers} layers, hidden {arch.hidden_size}, vocab {arch.vocab_size} (padded "
             f"{arch.padded_vocab_size(p.tp)})",
             f"batch: {trajectories} trajectories per step -> {u.epochs} epochs x {u.minibatches} optimizer steps, "
             f"each {trajectories // per_update} micro-batches of {u.micro_batch_size} per DP rank",
             f"loss: {config.loss.kind}, gate: {config.loss.gate.granularity}"
             + (f" (B={config.loss.gate.block_size})" if config.loss.gate.granularity == "block" else "")
             + (f", drift control: {control.kind} ({control.ratio})" if control.kind != "none" else "")
             + (", advantage from the current student" if config.loss.advantage_from == "current" else "")]
    return "\n".join(lines)
