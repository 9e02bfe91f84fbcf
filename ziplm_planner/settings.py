"""Choices and settings the CLI shares with the library, light to import (no torch): the CLI reads
its choices and defaults from here, so each is defined once."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace

from pathlib import Path

from .errors import UserError
from .timing import DEFAULT_ESTIMATOR, ESTIMATORS

ZIPLM = "ziplm"
METHODS = (ZIPLM, "magnitude", "uniform", "layerdrop", "kwon")  # the baselines: baselines.py, same table and budgets
# calibration inputs: of the dense model; of the one compressed so far, members re-pruned on them; or
# the dense model's structures, with weights fit on the compressed model's inputs to the dense output
DENSE, SEQUENTIAL, CORRECTED = "dense", "sequential", "corrected"
CALIBRATION_INPUTS = (DENSE, SEQUENTIAL, CORRECTED)
# a block's error at a level, in the search: OBS's relative output error times the block's Fisher on
# the calibration loss (loss units, comparable across blocks), or the relative error alone (the paper's)
FISHER, RELATIVE = "fisher", "relative"
BLOCK_ERRORS = (FISHER, RELATIVE)
# what SPDY scores candidates on: calibration samples the Hessians never saw, or the Hessians' own
HELD_OUT, CALIBRATION = "held-out", "calibration"
SCORE_ON = (HELD_OUT, CALIBRATION)
NONE, ONESHOT, GRADUAL = "none", "oneshot", "gradual"
LOSS_TERMS = ("task", "kl", "squarehead")  # LossWeights' fields in this order
RECOVERY_MODES = (NONE, ONESHOT, GRADUAL)
PRECISIONS = ("auto", "no", "bf16", "fp16")  # training autocast; "no" is float32
EMBEDDING, CLASSIFICATION, CAUSAL_LM = "embedding", "classification", "causal-lm"  # model kinds (models.py)
PERPLEXITY_SEQ_LEN = 512  # tokens per perplexity window, capped at the model's positions


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0  # LM cross-entropy on the training text (causal LMs), the task loss with labels
    kl: float = 1.0  # T^2 KL(teacher || student) on logits; pooled-embedding distance for embedding models
    # per-layer normalised hidden-state error, summed over layers; None: the model kind's (KindDefaults)
    squarehead: float | None = None
    temperature: float = 2.0

    @classmethod
    def parse(cls, text: str | None, temperature: float = 2.0) -> LossWeights:
        """'1,1,1' -> the task, KL and SquareHead weights, each a finite number >= 0; None: the defaults."""
        if not math.isfinite(temperature) or temperature <= 0:
            raise UserError(f"the distillation temperature must be a number > 0, got {temperature}")
        if text is None:
            return cls(temperature=temperature)
        try:
            values = [float(item) for item in text.split(",")]
        except ValueError:
            values = []
        if len(values) != len(LOSS_TERMS) or not all(math.isfinite(v) and v >= 0 for v in values):
            raise UserError(f"loss weights are {len(LOSS_TERMS)} numbers >= 0 for {', '.join(LOSS_TERMS)}, got {text!r}")
        return cls(*values, temperature=temperature)


@dataclass(frozen=True)
class KindDefaults:
    """Recovery settings a user leaves to the model, by its kind (chosen on the benchmarks)."""

    batch_size: int  # samples per step on each process
    squarehead: float  # SquareHead's loss weight


# About 512 real tokens a step either way: one window of running text (recovery.training_length) or 16
# sentences. At these budgets steps count more than their size: at 2x on SmolLM2 and 100k tokens, 195
# steps of one window recovered perplexity 83.6, 49 steps of four 95.6. SquareHead is off for causal LMs,
# whose logits carry the teacher: on SmolLM2 it cost 0.4-1.6 perplexity at 1.25-2x; on MiniLM at 5x it
# tied, and MiniLM's goals were met with it (BENCHMARKS).
CAUSAL_LM_DEFAULTS = KindDefaults(batch_size=1, squarehead=0.0)
OTHER_KIND_DEFAULTS = KindDefaults(batch_size=16, squarehead=1.0)


def kind_defaults(kind: str) -> KindDefaults:
    return CAUSAL_LM_DEFAULTS if kind == CAUSAL_LM else OTHER_KIND_DEFAULTS


@dataclass(frozen=True)
class TrainSettings:
    tokens: int = 500_000  # real tokens the student sees per member
    # samples per step on each process, and tokens per sample; None: what suits the model (KindDefaults,
    # recovery.training_length)
    batch_size: int | None = None
    seq_len: int | None = None
    learning_rate: float = 3e-4  # on SmolLM2 3e-4 recovered 1.8 perplexity more than 1e-4 (BENCHMARKS)
    warmup: float = 0.1  # share of the steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    weights: LossWeights = field(default_factory=LossWeights)
    # autocast dtype: "auto" is bf16 where the hardware multiplies it natively (bf16 GPUs, CPUs with AMX or
    # AVX-512 BF16), fp16 on other GPUs, float32 elsewhere
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10  # steps between points of the loss curve
    checkpoint_every: int = 200

    def __post_init__(self):
        if self.tokens < 1:
            raise UserError(f"the training budget must be at least 1 token, got {self.tokens}")
        if (self.batch_size is not None and self.batch_size < 1) or self.learning_rate <= 0 or not 0 <= self.warmup < 1:
            raise UserError("training needs batch size >= 1, learning rate > 0 and warm-up in [0, 1)")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"training samples need at least 2 tokens, got a sequence length of {self.seq_len}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown training precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def for_kind(self, kind: str) -> TrainSettings:
        """These settings with the batch size and SquareHead weight they leave to the model filled in."""
        defaults = kind_defaults(kind)
        weights = self.weights
        if weights.squarehead is None:
            weights = replace(weights, squarehead=defaults.squarehead)
        return replace(self, batch_size=self.batch_size or defaults.batch_size, weights=weights)


@dataclass(frozen=True)
class RecoverySettings:
    mode: str = NONE
    train_data: str | None = None  # a text, STS-B or GLUE file; default: the calibration file
    train: TrainSettings = field(default_factory=TrainSettings)
    # gradual: prune-and-distil steps per member, through intermediate speedups; the budget is split over them
    prune_steps: int = 1

    def __post_init__(self):
        if self.mode not in RECOVERY_MODES:
            raise UserError(f"unknown recovery {self.mode!r}: choose one of {', '.join(RECOVERY_MODES)}")
        if self.prune_steps < 1:
            raise UserError(f"prune steps per member must be at least 1, got {self.prune_steps}")
        if self.prune_steps > 1 and self.mode != GRADUAL:
            raise UserError(f"--prune-steps {self.prune_steps} prunes each member in steps from the last one: "
                            "it needs --recovery gradual")

    @property
    def step_train(self) -> TrainSettings:
        """Training at each pruning step: the member's budget split evenly over its steps."""
        return replace(self.train, tokens=math.ceil(self.train.tokens / self.prune_steps))


@dataclass(frozen=True)
class GenerationSettings:
    """Training text sampled from the dense model (synthetic.py)."""

    tokens: int = 250_000  # new tokens to write, prompts not counted
    seq_len: int = 128  # tokens per sample, prompt included: the training window
    prompt_tokens: int = 8  # tokens of real text each sample starts from, when a prompt file is given
    batch_size: int = 128  # samples generated together
    temperature: float = 1.0  # 1 with top_p 1 samples the model's own distribution, what distillation matches
    top_p: float = 1.0
    precision: str = "auto"  # autocast, as TrainSettings.precision
    seed: int = 0

    def __post_init__(self):
        if self.tokens < 1 or self.batch_size < 1:
            raise UserError(f"generation needs at least 1 token and a batch of at least 1, got {self.tokens} "
                            f"and {self.batch_size}")
        if not 1 <= self.prompt_tokens < self.seq_len:
            raise UserError(f"prompt tokens must be at least 1 and fewer than the {self.seq_len} tokens of a "
                            f"sample, got {self.prompt_tokens}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise UserError(f"sampling needs a temperature > 0 and top-p in (0, 1], got {self.temperature} "
                            f"and {self.top_p}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class CompressSettings:
    method: str = ZIPLM
    num_samples: int = 512
    seed: int = 0
    dampening: float = 0.01
    calibration_inputs: str = DENSE  # one of CALIBRATION_INPUTS
    block_errors: str = FISHER  # one of BLOCK_ERRORS
    search_evaluations: int = 30  # SPDY: stitched models scored per target
    score_samples: int = 128  # calibration samples the SPDY score uses
    score_on: str = CALIBRATION  # one of SCORE_ON
    verify_rounds: int = 20
    max_replans: int = 3
    onnx: bool = True
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    recovery: RecoverySettings = field(default_factory=RecoverySettings)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.calibration_inputs not in CALIBRATION_INPUTS:
            raise UserError(f"calibration inputs must be one of {', '.join(CALIBRATION_INPUTS)}, "
                            f"got {self.calibration_inputs!r}")
        if self.block_errors not in BLOCK_ERRORS:
            raise UserError(f"block errors must be one of {', '.join(BLOCK_ERRORS)}, got {self.block_errors!r}")
        if self.score_on not in SCORE_ON:
            raise UserError(f"score on must be one of {', '.join(SCORE_ON)}, got {self.score_on!r}")
        if self.num_samples < 1 or self.search_evaluations < 1 or self.score_samples < 1:
            raise UserError("number of samples, search evaluations and score samples must be at least 1")
        if self.verify_rounds < 2 or self.max_replans < 0:
            raise UserError(f"verify rounds must be at least 2 and max re-plans at least 0, got {self.verify_rounds} "
                            f"and {self.max_replans}")
        if self.recovery.mode == GRADUAL and self.calibration_inputs == SEQUENTIAL:
            raise UserError("--recovery gradual re-plans each member on the last one's own inputs: "
                            "drop --calibration-inputs sequential")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ziplm-planner"


@dataclass(frozen=True)
class ProfileSettings:
    ffn_step: int = 64  # FFN sizes timed: every multiple of this, plus the full size
    rounds: int = 40  # interleaved repetitions of every block candidate
    warmup: int = 3
    estimator: str = DEFAULT_ESTIMATOR
    additivity_models: int = 8  # random whole models, small to large, checked against the prediction (plus dense)
    additivity_rounds: int = 15
    retries: int = 2  # profiles again while the table fails its trust checks (a noisy machine), keeping the soundest
    seed: int = 0

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise UserError(f"estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if self.ffn_step < 1 or self.rounds < 2 or self.additivity_rounds < 2:
            raise UserError("ffn step must be >= 1 and rounds >= 2")
        if self.retries < 0:
            raise UserError(f"retries must be >= 0 (0: profile once, whatever the machine), not {self.retries}")


def default(cls, name: str):
    """A settings field's default, for the CLI."""
    spec = next(f for f in fields(cls) if f.name == name)
    return spec.default if spec.default is not MISSING else spec.default_factory()
