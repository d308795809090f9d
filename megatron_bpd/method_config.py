"""The settings of the method's math, as plain dataclasses that import nothing but the standard library: the gate
(``GateConfig``, used by ``gating``), the drift controls (``DriftControlConfig``, used by ``drift_controls``) and the
sampled-token advantage's source. ``train.config`` builds the trainer's config tree from them, so loading and
checking a config (``--dry-run``) needs neither torch nor Megatron.
"""

from dataclasses import dataclass, fields
from typing import Optional, Tuple

ADVANTAGE_FROM = ("old", "current")  # the sampled-token advantage from pi_old or from the current student

GRANULARITIES = ("none", "token", "block", "span", "sequence")
STATISTICS = ("signed_mean", "abs_mean", "rms")
GATE_FNS = ("exp", "hard")
SCOPES = ("sequence", "micro-batch", "global")


@dataclass
class GateConfig:
    """How drift is aggregated into gates. Defaults follow the paper's Block64 variant.

    ``scope`` is where the gates are mean-normalized (the paper leaves it open): each "sequence", the
    "micro-batch" of one call (default), or the "global" optimizer-step batch across micro-batches and
    data-parallel ranks (needs the normalizer terms of every micro-batch first: ``normalizer=`` of ``drift_gates``).
    ``span_min_len``/``span_max_len``/``span_fallback_block`` are the NewlineSpan rules used by
    ``newline_span_starts`` (the paper leaves them open; defaults 8 / 256 / 64).
    """

    granularity: str = "block"
    block_size: int = 64
    statistic: str = "signed_mean"
    gate_fn: str = "exp"
    tau: float = 1.0
    threshold: Optional[float] = None
    normalize: bool = True
    scope: str = "micro-batch"
    span_min_len: int = 8
    span_max_len: int = 256
    span_fallback_block: int = 64

    def __post_init__(self):
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("statistic", self.statistic, STATISTICS)
        _check_choice("gate_fn", self.gate_fn, GATE_FNS)
        _check_choice("scope", self.scope, SCOPES)
        if self.block_size < 1:
            raise ValueError(f"GateConfig.block_size must be >= 1, got {self.block_size}")
        if self.tau < 0:
            raise ValueError(f"GateConfig.tau must be >= 0, got {self.tau}")
        if self.gate_fn == "hard" and (self.threshold is None or self.threshold < 0):
            raise ValueError(f"GateConfig.gate_fn='hard' needs a threshold >= 0, got {self.threshold}")
        if not 1 <= self.span_min_len <= self.span_max_len:
            raise ValueError(f"GateConfig needs 1 <= span_min_len <= span_max_len, got "
                             f"{self.span_min_len}, {self.span_max_len}")
        if self.span_fallback_block < 1:
            raise ValueError(f"GateConfig.span_fallback_block must be >= 1, got {self.span_fallback_block}")

    @property
    def segment_block_size(self) -> Optional[int]:
        """Fixed block length of the granularity, or None for spans (and for "none")."""
        return {"token": 1, "block": self.block_size}.get(self.granularity)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"GateConfig.{name} must be one of {choices}, got {value!r}")


KINDS = ("none", "token_drop", "icepop", "tis", "seq_mask", "m2po")
PARAMETERS = {"token_drop": ("drop_below", "drop_above", "penalty"), "icepop": ("ratio_bounds",), "tis": ("cap",),
              "seq_mask": ("seq_bounds",), "m2po": ("m2_threshold",)}
RATIOS = {"token_drop": "current/behavior", "icepop": "proximal/behavior", "tis": "proximal/behavior",
          "seq_mask": "proximal/behavior", "m2po": "proximal/behavior"}
# the controls whose weight is an importance weight of the sampled token: they correct a sampled-token estimator
IMPORTANCE_WEIGHTED = ("icepop", "tis", "seq_mask")


@dataclass
class DriftControlConfig:
    """``loss.drift_control``: ``kind`` and the parameters of that kind; defaults are the sources' defaults.

    token_drop: ``drop_below`` 0.2 and ``drop_above`` None (prime-rl's distillation loss: one-sided; set it for the
    two-sided trust region of prime-rl's RL loss, 0.2 there), ``penalty`` 1e-3. icepop: ``ratio_bounds`` [0.5, 5]
    (IcePop). tis: ``cap`` 2 (verl, slime). seq_mask: ``seq_bounds`` [0.999, 1.002] (NeMo-RL's reference bounds).
    m2po: ``m2_threshold`` 0.04 (M2PO). Setting another kind's parameter is an error.
    """

    kind: str = "none"
    drop_below: float = 0.2
    drop_above: Optional[float] = None
    penalty: float = 1e-3
    ratio_bounds: Tuple[float, float] = (0.5, 5.0)
    cap: float = 2.0
    seq_bounds: Tuple[float, float] = (0.999, 1.002)
    m2_threshold: float = 0.04

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"loss.drift_control.kind must be one of {KINDS}, got {self.kind!r}")
        self.ratio_bounds, self.seq_bounds = tuple(self.ratio_bounds), tuple(self.seq_bounds)
        for f in fields(self):
            changed = f.name != "kind" and getattr(self, f.name) != f.default
            if changed and f.name not in PARAMETERS.get(self.kind, ()):
                owner = next(k for k, names in PARAMETERS.items() if f.name in names)
                raise ValueError(f"loss.drift_control.{f.name} is a parameter of kind {owner!r}, not of "
                                 f"{self.kind!r}")
        for name in ("drop_below", "cap", "m2_threshold") + (("drop_above",) if self.drop_above is not None else ()):
            if not getattr(self, name) > 0:
                raise ValueError(f"loss.drift_control.{name} must be > 0, got {getattr(self, name)}")
        if not self.penalty >= 0:
            raise ValueError(f"loss.drift_control.penalty must be >= 0, got {self.penalty}")
        for name in ("ratio_bounds", "seq_bounds"):
            low, high = getattr(self, name)
            if not 0 <= low < high:
                raise ValueError(f"loss.drift_control.{name} must be [low, high] with 0 <= low < high, got "
                                 f"[{low}, {high}]")

    @property
    def ratio(self) -> Optional[str]:
        """Which log-ratio the control reads: "current/behavior", "proximal/behavior", or None (kind "none")."""
        return RATIOS.get(self.kind)
