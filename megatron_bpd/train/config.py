"""Everything a user tunes, in one tree of plain dataclasses, loaded from YAML with ``key.sub=value`` overrides.

Unknown keys are errors (a typo never silently falls back to a default). ``TrainConfig.describe()`` prints the
whole tree at the start of every run.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from ..method_config import ADVANTAGE_FROM, IMPORTANCE_WEIGHTED, DriftControlConfig, GateConfig


@dataclass
class ModelSettings:
    """Student (trained) and its initial weights: an HF folder or a Megatron checkpoint made by tools/.
    ``precision`` "bf16" trains in bfloat16 with float32 main weights in the optimizer (GPU clusters); "fp32"."""

    student: str = ""
    student_megatron_checkpoint: Optional[str] = None
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"model.precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass
class ParallelSettings:
    tp: int = 1
    pp: int = 1
    cp: int = 1


@dataclass
class DataSettings:
    """Prompts from a JSONL file: ``prompt`` or ``problem`` field (and ``answer`` for the solve rate)."""

    prompts: str = ""
    prompt_template: str = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    apply_chat_template: bool = True
    # "math" (math-verify on \boxed{}) | "none" | a synthetic task's exact checker: its name ("addition",
    # "running_sum": megatron_bpd.tasks.registry) or "arithmetic" (the same answer-line checker)
    answer_checker: str = "math"
    max_prompt_len: int = 2048
    shuffle: bool = True
    difficulty_key: str = "difficulty"  # optional prompt field; solve rates and evaluations are grouped by it

    def __post_init__(self):
        from megatron_bpd.tasks.registry import TASKS

        known = ("math", "none", "arithmetic", *TASKS)
        if self.answer_checker not in known:
            raise ValueError(f"data.answer_checker must be one of {', '.join(known)}, got {self.answer_checker!r}")


@dataclass
class RolloutSettings:
    """Where and how the student samples. ``servers``: SGLang server or router URLs, or ["embedded"] to start
    ``embedded_servers`` of the project's own server as subprocesses (CPU machines). ``policy``: "student"
    (on-policy, the default) or "teacher" (the teacher servers sample: off-policy distillation, the control of
    the experiments, with ``loss.kind: sft``). ``api_key``: the servers' ``--api-key`` (None: $SGLANG_API_KEY if
    set; embedded servers are started with it); never printed. ``max_staleness`` k: step s trains on rollouts
    sampled with the weights of step s - k, generated while the trainer trains the steps before (0: the
    synchronous loop; with k > 0 see reuse.old_logprobs for which policy the loss and the gate take as pi_old)."""

    servers: List[str] = field(default_factory=lambda: ["embedded"])
    policy: str = "student"
    embedded_servers: int = 1
    prompts_per_step: int = 4
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = -1
    max_new_tokens: int = 16384
    stop_token_ids: List[int] = field(default_factory=list)
    mask_special_tokens: List[str] = field(default_factory=list)  # e.g. ["<", "think", "<|im_end|>"]
    max_concurrency: int = 64
    request_timeout_s: float = 3600.0
    api_key: Optional[str] = None
    max_staleness: int = 0

    def __post_init__(self):
        if self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0, got {self.max_staleness}")
        if self.policy not in ("student", "teacher"):
            raise ValueError(f"rollout.policy must be 'student' or 'teacher', got {self.policy!r}")


@dataclass
class TeacherSettings:
    """``source`` "sglang": teacher servers (``servers``, or ["embedded"] to start one on ``model``);
    "megatron": the teacher ``model`` (HF folder) runs inside the trainer on the same parallel layout.
    ``api_key`` as for the rollout servers."""

    source: str = "sglang"
    model: str = ""
    servers: List[str] = field(default_factory=lambda: ["embedded"])
    top_k: int = 32
    api_key: Optional[str] = None

    def __post_init__(self):
        if self.source not in ("sglang", "megatron"):
            raise ValueError(f"teacher.source must be 'sglang' or 'megatron', got {self.source!r}")


@dataclass
class ReuseSettings:
    """Each rollout batch trains ``epochs`` x ``minibatches`` optimizer steps (the paper: 2 epochs).
    ``old_logprobs``, the pi_old of the advantage, the PPO ratio and the gate's drift: "recompute" (default) with
    the current weights before the first update, or "rollout" (the server's behavior log-probs). With
    rollout.max_staleness 0 the two are the same policy. With overlapped rollouts (k > 0) "rollout" is the policy that
    sampled, k versions old (the paper's pi_old: the gate sees the whole drift since sampling, and the advantage
    lp_teach - lp_old lags the student by k versions); "recompute" is the proximal policy (decoupled PPO's name for
    it; what RL frameworks recompute when they do not train on the engine's log-probs): the advantage is the
    current student's, and the gate sees only the drift within the step (``behavior_drift_abs_mean`` logs the drift
    since sampling)."""

    epochs: int = 2
    minibatches: int = 1
    micro_batch_size: int = 1
    old_logprobs: str = "recompute"

    def __post_init__(self):
        if self.old_logprobs not in ("recompute", "rollout"):
            raise ValueError(f"reuse.old_logprobs must be 'recompute' or 'rollout', got {self.old_logprobs!r}")


LOSSES = ("sampled_token", "topk_lsm", "sft")


@dataclass
class LossConfig:
    """The OPD loss: ``kind`` "sampled_token" (PPO with teacher advantage) or "topk_lsm" (Teacher-TopK/LSM); or
    "sft", the off-policy control: l_t = -lp_cur_t, the negative log-likelihood of the sampled tokens (with
    ``rollout.policy: teacher``, supervised fine-tuning on teacher samples; gates do not apply)."""

    kind: str = "sampled_token"
    gate: GateConfig = field(default_factory=GateConfig)
    clip_eps: Tuple[float, float] = (0.2, 0.2)
    adv_clip: float = 5.0
    # dual-clip PPO: where the advantage is negative, the loss is held at most -c A (no gradient once r > c);
    # None: off. Bounds the push-down of tokens the current policy rates far above a stale behavior policy.
    dual_clip: Optional[float] = None
    log_ratio_clip: float = 5.0
    temperature: float = 1.0
    vocab_size: Optional[int] = None  # the real vocabulary when the model's is padded for TP
    # the output layer fused with the loss and every no-grad pass (forward_step.head_forward): the logits
    # [b, s, V/tp] and their gradient are never held
    fused_head: bool = True
    # positions per chunk of the LM head's vocabulary ops (memory: chunk x V/tp float32); None: as many as fill 128 MiB
    chunk_tokens: Optional[int] = None
    # LSM "tail": S_t = top-K(q) plus the sampled token y_t when it is not among them (K + 1 entries).
    tail: bool = False
    # Train only on this fraction of the mini-batch's valid positions with the highest student entropy
    # (losses.top_entropy_mask over all micro-batches and DP/CP ranks; the loss is normalized by the kept count and
    # the gates stay normalized over all valid positions). 1.0: every position.
    top_entropy_fraction: float = 1.0
    # a control of stale or reused samples, as per-position weights beside the gates (drift_controls; kind "none":
    # off). "tis" is decoupled PPO's truncated pi_old / pi_behavior (the former loss.behavior_weight_cap).
    drift_control: DriftControlConfig = field(default_factory=DriftControlConfig)
    # the sampled-token advantage lp_teach - lp_student from "old" (pi_old, fixed over the step) or "current" (the
    # current student at each update, detached: AsyncOPD)
    advantage_from: str = "old"

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise ValueError(f"LossConfig.kind must be one of {LOSSES}, got {self.kind!r}")
        if not 0.0 < self.top_entropy_fraction <= 1.0:
            raise ValueError(f"loss.top_entropy_fraction must be in (0, 1], got {self.top_entropy_fraction}")
        self.clip_eps = tuple(self.clip_eps)
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"loss.dual_clip must be > 1 (or null for off), got {self.dual_clip}")
        if self.advantage_from not in ADVANTAGE_FROM:
            raise ValueError(f"loss.advantage_from must be one of {ADVANTAGE_FROM}, got {self.advantage_from!r}")
        if self.advantage_from == "current" and self.kind != "sampled_token":
            raise ValueError(f"loss.advantage_from 'current' recomputes the sampled-token advantage: it needs the "
                             f"sampled_token loss, got {self.kind!r} (which has no advantage)")
        control = self.drift_control.kind
        if control != "none" and self.kind == "sft":
            raise ValueError(f"the sft loss takes no drift control (loss.drift_control.kind must be 'none', got "
                             f"{control!r}): its samples are the teacher's")
        if control in IMPORTANCE_WEIGHTED and self.kind != "sampled_token":
            raise ValueError(f"loss.drift_control.kind {control!r} weighs a position by the importance ratio of its "
                             f"sampled token, which corrects the sampled_token loss's estimate; the {self.kind} loss "
                             "is exact on the teacher's support: use token_drop or m2po with it")
        if self.kind == "sft" and self.gate.granularity != "none":
            raise ValueError(f"the sft loss takes no gate (gate.granularity must be 'none', got "
                             f"{self.gate.granularity!r})")


@dataclass
class EvalSettings:
    """``every``: steps between held-out evaluations (0: none); ``prompts``: held-out prompts JSONL (the
    ``data.prompts`` format, with answers); ``limit``: evaluate the first N (0: all); ``samples``: responses per
    prompt for pass@1 (0: greedy only); ``probe_prompts`` x ``probe_samples``: the support-KL probe (0: off)."""

    every: int = 0
    prompts: str = ""
    limit: int = 0
    samples: int = 4
    probe_prompts: int = 8
    probe_samples: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.every < 0 or self.limit < 0 or self.samples < 0 or self.probe_prompts < 0 or self.probe_samples < 1:
            raise ValueError(f"eval settings must be non-negative (probe_samples >= 1): {self}")


@dataclass
class OptimizerSettings:
    """The optimizer's settings (``megatron.core.optimizer.OptimizerConfig`` fields of the same names) and its
    learning-rate schedule (Megatron's ``OptimizerParamScheduler``, counted in optimizer updates): linear warmup
    from 0 over ``lr_warmup_steps``, then ``lr_decay_style`` "constant", "linear" or "cosine" down to ``min_lr``
    at the run's last update."""

    optimizer: str = "adam"
    lr: float = 2e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optimizer.lr_decay_style must be 'constant', 'linear' or 'cosine', got "
                             f"{self.lr_decay_style!r}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"optimizer.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class CheckpointSettings:
    dir: Optional[str] = None
    every: int = 0  # steps; 0: only at the end
    resume: bool = False


@dataclass
class TrainConfig:
    out: str = "runs/train"
    steps: int = 200
    seed: int = 1234
    # What the gate sees: per-position drift and gates of the first N trajectories of every step, at every update,
    # written to gate_trace.jsonl (0: off).
    gate_trace: int = 0
    model: ModelSettings = field(default_factory=ModelSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    reuse: ReuseSettings = field(default_factory=ReuseSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self):
        control = self.loss.drift_control
        if control.kind != "none" and self.rollout.policy != "student":
            raise ValueError(f"loss.drift_control {control.kind!r} reads the student's rollout log-probs "
                             f"(pi_behavior): it needs rollout.policy 'student', got {self.rollout.policy!r}")
        if control.ratio == "proximal/behavior" and self.reuse.old_logprobs != "recompute":
            raise ValueError(f"loss.drift_control {control.kind!r} reads pi_old / pi_behavior with a recomputed "
                             f"(proximal) pi_old: it needs reuse.old_logprobs 'recompute', got "
                             f"{self.reuse.old_logprobs!r} (with 'rollout' the ratio is 1 everywhere)")
        if self.rollout.policy == "teacher" and self.teacher.source != "sglang":
            raise ValueError("rollout.policy 'teacher' samples from the teacher servers: it needs teacher.source "
                             f"'sglang', got {self.teacher.source!r}")
        if self.loss.kind == "sampled_token" and self.loss.temperature != self.rollout.temperature:
            raise ValueError(f"loss.temperature={self.loss.temperature} must equal rollout.temperature="
                             f"{self.rollout.temperature}: behavior log-probs are at the rollout temperature")
        if self.gate_trace < 0:
            raise ValueError(f"gate_trace must be >= 0 (trajectories traced per step), got {self.gate_trace}")
        if self.eval.every:
            if not self.eval.prompts:
                raise ValueError("eval.every > 0 needs eval.prompts (a held-out prompts JSONL with answers)")
            if self.data.answer_checker == "none":
                raise ValueError("eval.every > 0 needs data.answer_checker (not 'none') to score answers")

    def describe(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)


SECRETS = ("api_key",)  # printed as "***" when set


def to_dict(config) -> dict:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else (list(value) if isinstance(value, tuple)
                                                                               else value)
        if f.name in SECRETS and value is not None:
            out[f.name] = "***"
    return out


# keys that no longer exist, and what replaced them
REPLACED = {"loss.behavior_weight_cap": "loss.drift_control: {kind: tis, cap: C} (the same truncated weight "
                                        "min(pi_old / pi_behavior, C))"}


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from nested dicts; unknown keys raise ValueError naming them (and what replaced a
    key that no longer exists)."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {type(data).__name__}")
    for key in data:
        if where + key in REPLACED:
            raise ValueError(f"config key {where + key} was replaced by {REPLACED[where + key]}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                         f"valid keys of {where or 'the root'}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = from_dict(kind, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(kind, value, where + name)
    return cls(**kwargs)


def _coerce(kind, value, key: str):
    """YAML reads ``3e-4`` as a string and ``1`` as an int: give float fields floats, and name a value that is not
    a number where one is expected."""
    if kind is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config key {key} must be a number, got {value!r}") from None
    if kind is int and isinstance(value, str):
        raise ValueError(f"config key {key} must be an integer, got {value!r}")
    return value


def apply_override(data: dict, override: str) -> None:
    """``a.b.c=value`` (value parsed as YAML) into nested dicts."""
    if "=" not in override:
        raise ValueError(f"override {override!r} is not of the form key.sub=value")
    key, value = override.split("=", 1)
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def read_yaml(path) -> dict:
    """A config file as nested dicts; ``base: other.yaml`` (relative to the file) is read first and this file's
    keys are merged over it, section by section."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    base = data.pop("base", None)
    return _merge(read_yaml(Path(path).parent / base), data) if base else data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: Optional[str] = None, overrides=()) -> TrainConfig:
    """A TrainConfig from a YAML file (or defaults) and ``key.sub=value`` overrides."""
    data = read_yaml(path) if path else {}
    for override in overrides:
        apply_override(data, override)
    return from_dict(TrainConfig, data)

