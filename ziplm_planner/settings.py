"""Settings of recovery training, light to import: the CLI reads its defaults from here, so each
default is defined once (DESIGN.md, "Recovery")."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from .errors import UserError

NONE, ONESHOT, GRADUAL = "none", "oneshot", "gradual"
LOSS_TERMS = ("task", "kl", "squarehead")  # LossWeights' fields in this order
RECOVERY_MODES = (NONE, ONESHOT, GRADUAL)


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0  # LM cross-entropy on the training text (causal LMs), the task loss with labels
    kl: float = 1.0  # T^2 KL(teacher || student) on logits; pooled-embedding distance for embedding models
    squarehead: float = 1.0  # per-layer normalised hidden-state error, summed over layers
    temperature: float = 2.0

    @classmethod
    def parse(cls, text: str, temperature: float = 2.0) -> LossWeights:
        """'1,1,1' -> the task, KL and SquareHead weights, each a finite number >= 0."""
        try:
            values = [float(item) for item in text.split(",")]
        except ValueError:
            values = []
        if len(values) != len(LOSS_TERMS) or not all(math.isfinite(v) and v >= 0 for v in values):
            raise UserError(f"loss weights are {len(LOSS_TERMS)} numbers >= 0 for {', '.join(LOSS_TERMS)}, got {text!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise UserError(f"the distillation temperature must be a number > 0, got {temperature}")
        return cls(*values, temperature=temperature)


@dataclass(frozen=True)
class TrainSettings:
    tokens: int = 500_000  # real tokens the student sees per member
    batch_size: int = 16  # samples per step on each process
    learning_rate: float = 1e-4
    warmup: float = 0.1  # share of the steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    weights: LossWeights = field(default_factory=LossWeights)
    seed: int = 0
    log_every: int = 10  # steps between points of the loss curve
    checkpoint_every: int = 200

    def __post_init__(self):
        if self.tokens < 1:
            raise UserError(f"the training budget must be at least 1 token, got {self.tokens}")
        if self.batch_size < 1 or self.learning_rate <= 0 or not 0 <= self.warmup < 1:
            raise UserError("training needs batch size >= 1, learning rate > 0 and warm-up in [0, 1)")


@dataclass(frozen=True)
class RecoverySettings:
    mode: str = NONE
    train_data: str | None = None  # a text, STS-B or GLUE file; default: the calibration file
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        if self.mode not in RECOVERY_MODES:
            raise UserError(f"unknown recovery {self.mode!r}: choose one of {', '.join(RECOVERY_MODES)}")


def default(cls, name: str):
    """A settings field's default, for the CLI."""
    spec = next(f for f in fields(cls) if f.name == name)
    return spec.default if spec.default is not MISSING else spec.default_factory()
