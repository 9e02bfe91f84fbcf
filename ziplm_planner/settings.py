"""Choices and settings the CLI shares with the library, light to import (no torch). Each settings field
carries its command-line option in its metadata (Option): cli.py makes the click options from the
fields, so each option, its default, choices and help, is defined once."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .planners import METHODS, ZIPLM
from .timing import DEFAULT_ESTIMATOR, ESTIMATORS

if TYPE_CHECKING:  # kinds imports torch; the CLI reads this module without it
    from .kinds import ModelKind

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
LOSS_TERMS = ("task", "kl", "squarehead", "contrastive")  # LossWeights' fields in this order (contrastive optional)
CAP_TEACHERS = ("dense", "snapshots", "classes")  # CAP's pre-trained, snapshot and fine-tuned (same-class) terms
# on MiniLM the dense model carried CAP's gain: the snapshots added at most 0.07 points for 13% fewer tokens a
# second (BENCHMARKS, issue 32); same-class positives are not measured here (no labelled task model)
DEFAULT_CAP_TEACHERS = ("dense",)
RECOVERY_MODES = (NONE, ONESHOT, GRADUAL)
PRECISIONS = ("auto", "no", "bf16", "fp16")  # training autocast; "no" is float32
PERPLEXITY_SEQ_LEN = 512  # tokens per perplexity window, capped at the model's positions


@dataclass(frozen=True)
class Option:
    """A settings field on the command line, kept in the field's metadata (`option(...)`).

    An Option with help declares its flag; one without reads a flag another field declares (--seed seeds
    training too; the three loss weights read --loss-weights). A flag left out, None, leaves its fields at
    their defaults; a bool field's flag flips its default (--no-onnx)."""

    help: str = ""
    flag: str | None = None  # default: --the-field-name
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], object] | None = None  # the flag's text -> the field's value, where not its type
    default: Callable[[], object] | None = None  # the CLI's where not the field's, computed when left out
    show_default: bool = True


CLI = "cli"  # the metadata key: an Option, or None for a field set in Python only
PYTHON_ONLY = {CLI: None}


def option(help: str = "", **kwargs) -> dict:
    """Field metadata: the field's command-line option."""
    return {CLI: Option(help, **kwargs)}


def option_flag(name: str, option: Option) -> str:
    """A field's flag: the one its option names, else --the-field-name."""
    return option.flag or "--" + name.replace("_", "-")


def command_flags(settings) -> list[str]:
    """The command-line options that give `settings`: one per field not at its default, as the CLI reads
    them (a flag several fields parse, --loss-weights, once with all their values; a flag another field
    declares, never)."""
    default, flags, parsed = type(settings)(), [], {}
    for f in fields(settings):
        value, option = getattr(settings, f.name), f.metadata.get(CLI)
        if is_dataclass(value):
            flags += command_flags(value)
        elif option and option.parse and value != getattr(default, f.name):
            values = [getattr(settings, g.name) for g in fields(settings)
                      if (g.metadata.get(CLI) or Option()).flag == option.flag]
            if None not in values:  # a weight left to the model kind (None, Python only) has no flag
                parsed[option_flag(f.name, option)] = ",".join(map(flag_text, values))
        elif option and option.help and value != getattr(default, f.name):
            flags += [option_flag(f.name, option)] + ([] if isinstance(value, bool) else [str(value)])
    return flags + [item for flag, values in parsed.items() for item in (flag, values)]


def flag_text(value) -> str:
    """A parsed field's value as its flag's text: a number, or names joined by commas."""
    return ",".join(value) if isinstance(value, tuple) else f"{value:g}"


def loss_terms(text: str) -> tuple[float, ...]:
    """'1,1,1' or '1,1,1,0.1' -> the task, KL, SquareHead and contrastive weights (0 when left out), each a
    finite number >= 0."""
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (len(LOSS_TERMS) - 1, len(LOSS_TERMS)) or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"loss weights are {len(LOSS_TERMS) - 1} or {len(LOSS_TERMS)} numbers >= 0 for "
                        f"{', '.join(LOSS_TERMS[:-1])}[, {LOSS_TERMS[-1]}], got {text!r}")
    return values + (0.0,) * (len(LOSS_TERMS) - len(values))


def loss_weight(term: str) -> dict:
    """A loss weight on the command line: its term of --loss-weights (declared by TrainSettings.weights)."""
    return option(flag="--loss-weights", parse=lambda text: loss_terms(text)[LOSS_TERMS.index(term)])


@dataclass(frozen=True)
class LossWeights:
    # LM cross-entropy on the training text (causal LMs), the task loss with labels
    task: float = field(default=1.0, metadata=loss_weight("task"))
    # T^2 KL(teacher || student) on logits; pooled-embedding distance for embedding models
    kl: float = field(default=1.0, metadata=loss_weight("kl"))
    # per-layer normalised hidden-state error, summed over layers; None: the model kind's (KindDefaults)
    squarehead: float | None = field(default=None, metadata=loss_weight("squarehead"))
    # CAP's contrastive term (ContrastiveSettings), 0: off; None: the model kind's (KindDefaults)
    contrastive: float | None = field(default=None, metadata=loss_weight("contrastive"))
    temperature: float = field(default=2.0, metadata=option("Recovery: distillation temperature of the KL term."))

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise UserError(f"the distillation temperature must be a number > 0, got {self.temperature}")

    @classmethod
    def parse(cls, text: str | None, **others) -> LossWeights:
        """'1,1,1[,c]' -> the task, KL, SquareHead (and contrastive) weights (None: the defaults), beside
        `others` (the temperature)."""
        terms = {} if text is None else dict(zip(LOSS_TERMS, loss_terms(text)))
        return cls(**terms, **others)

    def completed(self, kind: KindDefaults) -> LossWeights:
        """These weights with those they leave to the model kind (None) filled in."""
        return replace(self, **{term: getattr(kind, term) for term in ("squarehead", "contrastive")
                                if getattr(self, term) is None})


def file_list(text: str | None) -> list[str]:
    """'a.csv, b.tsv' -> the items a comma-separated option names, paths or names (None: none)."""
    return [] if text is None else [part.strip() for part in text.split(",") if part.strip()]


def cap_teachers(text: str) -> tuple[str, ...]:
    """'dense,snapshots' -> the teachers of CAP's contrastive term, each one of CAP_TEACHERS, once."""
    names = tuple(file_list(text))
    if not names or len(set(names)) != len(names) or not set(names) <= set(CAP_TEACHERS):
        raise UserError(f"contrastive teachers are some of {', '.join(CAP_TEACHERS)}, each once, got {text!r}")
    return names


@dataclass(frozen=True)
class ContrastiveSettings:
    """CAP (Xu et al., AAAI 2022): InfoNCE between the student's representation of an example and its
    teachers' representations of it (positives), against their representations of the batch's other
    examples and of a memory of recent batches (negatives). Used where LossWeights.contrastive > 0."""

    teachers: tuple[str, ...] = field(default=DEFAULT_CAP_TEACHERS, metadata=option(
        "Recovery: the contrastive term's teachers: dense (the dense model), snapshots (each model trained earlier "
        "in the run: the larger members and steps of a gradual run), classes (same-label examples are positives too, "
        "where the data has labels) [default: " + ",".join(DEFAULT_CAP_TEACHERS) + "].", flag="--contrastive-teachers",
        parse=cap_teachers))
    temperature: float = field(default=0.1, metadata=option(
        "Recovery: temperature of the contrastive term.", flag="--contrastive-temperature"))
    memory: int = field(default=1024, metadata=option(
        "Recovery: representations of recent batches kept per teacher as the contrastive term's negatives.",
        flag="--contrastive-memory"))

    def __post_init__(self):
        cap_teachers(",".join(self.teachers))
        if not math.isfinite(self.temperature) or self.temperature <= 0 or self.memory < 0:
            raise UserError(f"the contrastive temperature must be > 0 and its memory >= 0, got {self.temperature} "
                            f"and {self.memory}")


@dataclass(frozen=True)
class KindDefaults:
    """Recovery settings a user leaves to the model, by its kind (kinds.ModelKind.defaults; chosen on the
    benchmarks)."""

    batch_size: int  # samples per step on each process
    squarehead: float  # SquareHead's loss weight
    contrastive: float  # CAP's contrastive term's weight


# About 512 real tokens a step either way: one window of running text (recovery.training_length) or 16
# sentences. At these budgets steps count more than their size: at 2x on SmolLM2 and 100k tokens, 195
# steps of one window recovered perplexity 83.6, 49 steps of four 95.6. SquareHead is off for causal LMs,
# whose logits carry the teacher: on SmolLM2 it cost 0.4-1.6 perplexity at 1.25-2x; on MiniLM at 5x it
# tied, and MiniLM's goals were met with it (BENCHMARKS). CAP's contrastive term kept 0.1-0.5 points more of
# dense STS-B at MiniLM 3-8x, at no cost in tokens a second, and cost SmolLM2 up to 1.8 perplexity (issue 32).
CAUSAL_LM_DEFAULTS = KindDefaults(batch_size=1, squarehead=0.0, contrastive=0.0)
OTHER_KIND_DEFAULTS = KindDefaults(batch_size=16, squarehead=1.0, contrastive=0.1)


def default_weights(kind: KindDefaults) -> str:
    """--loss-weights as a model of this kind gets them when the flag is left out."""
    weights = LossWeights()
    return f"{weights.task:g},{weights.kl:g},{kind.squarehead:g}" + (f",{kind.contrastive:g}" if kind.contrastive else "")


@dataclass(frozen=True)
class TrainSettings:
    tokens: int = field(default=500_000, metadata=option("Recovery: real tokens each member is trained on.",
                                                         flag="--train-tokens"))
    # samples per step on each process, and tokens per sample; None: what suits the model (KindDefaults,
    # recovery.training_length)
    batch_size: int | None = field(default=None, metadata=option(
        f"Recovery: samples per step on each process [default: {CAUSAL_LM_DEFAULTS.batch_size} for causal LMs, "
        f"{OTHER_KIND_DEFAULTS.batch_size} for others: about 512 tokens either way].", flag="--train-batch-size"))
    seq_len: int | None = field(default=None, metadata=option(
        f"Recovery: tokens per training sample [default: {PERPLEXITY_SEQ_LEN} for causal LMs (capped at the model's "
        "positions), the calibration length for others].", flag="--train-seq-len"))
    # on SmolLM2 3e-4 recovered 1.8 perplexity more than 1e-4 (BENCHMARKS)
    learning_rate: float = field(default=3e-4, metadata=option(
        "Recovery: AdamW peak learning rate (linear warm-up, then linear decay)."))
    warmup: float = field(default=0.1, metadata=option("Recovery: share of the steps spent warming up."))
    weight_decay: float = field(default=0.0, metadata=PYTHON_ONLY)
    max_grad_norm: float = field(default=1.0, metadata=PYTHON_ONLY)
    weights: LossWeights = field(default_factory=LossWeights, metadata=option(
        f"Recovery: weights of the {', '.join(LOSS_TERMS[:-1])} and (optional, CAP) {LOSS_TERMS[-1]} loss terms "
        f"[default: {default_weights(CAUSAL_LM_DEFAULTS)} for causal LMs, {default_weights(OTHER_KIND_DEFAULTS)} for "
        "others, no contrastive term].", flag="--loss-weights"))
    contrastive: ContrastiveSettings = field(default_factory=ContrastiveSettings)
    # autocast dtype: "auto" is bf16 where the hardware multiplies it natively (bf16 GPUs, CPUs with AMX or
    # AVX-512 BF16), fp16 on other GPUs, float32 elsewhere
    precision: str = field(default="auto", metadata=option(
        "Recovery: autocast dtype. auto: bf16 on GPUs that have it and on CPUs with AMX or AVX-512 BF16, fp16 on "
        "other GPUs, float32 (no) on other CPUs.", flag="--train-precision", choices=PRECISIONS))
    seed: int = field(default=0, metadata=option(flag="--seed"))  # on the command line, the run's seed
    log_every: int = field(default=10, metadata=PYTHON_ONLY)  # steps between points of the loss curve
    checkpoint_every: int = field(default=200, metadata=PYTHON_ONLY)

    def __post_init__(self):
        if self.tokens < 1:
            raise UserError(f"the training budget must be at least 1 token, got {self.tokens}")
        if (self.batch_size is not None and self.batch_size < 1) or self.learning_rate <= 0 or not 0 <= self.warmup < 1:
            raise UserError("training needs batch size >= 1, learning rate > 0 and warm-up in [0, 1)")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"training samples need at least 2 tokens, got a sequence length of {self.seq_len}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown training precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def for_kind(self, kind: ModelKind) -> TrainSettings:
        """These settings with the batch size and the SquareHead and contrastive weights they leave to the
        model filled in."""
        return replace(self, batch_size=self.batch_size or kind.defaults.batch_size,
                       weights=self.weights.completed(kind.defaults))


@dataclass(frozen=True)
class RecoverySettings:
    mode: str = field(default=NONE, metadata=option(
        "none: members as pruned; oneshot: each member pruned from the dense model, then distilled; gradual: each "
        "member pruned from the last one (re-planned on it), then distilled.", flag="--recovery",
        choices=RECOVERY_MODES))
    train_data: str | None = field(default=None, metadata=option(
        "Recovery training text, STS-B or GLUE file, or several, comma-separated (their samples mixed) "
        "[default: --calib]."))
    train: TrainSettings = field(default_factory=TrainSettings)
    prune_steps: int = field(default=1, metadata=option(
        "Gradual: prune-and-distil steps per member, through intermediate speedups spaced evenly in log speedup "
        "from the last member's; --train-tokens is split over them."))

    def __post_init__(self):
        if self.mode not in RECOVERY_MODES:
            raise UserError(f"unknown recovery {self.mode!r}: choose one of {', '.join(RECOVERY_MODES)}")
        if self.prune_steps < 1:
            raise UserError(f"prune steps per member must be at least 1, got {self.prune_steps}")
        if self.prune_steps > 1 and self.mode != GRADUAL:
            raise UserError(f"--prune-steps {self.prune_steps} prunes each member in steps from the last one: "
                            "it needs --recovery gradual")

    @property
    def train_files(self) -> list[str]:
        """The training files --train-data names (none: the calibration file is trained on)."""
        return file_list(self.train_data)

    @property
    def trains(self) -> bool:
        return self.mode != NONE

    @property
    def nested(self) -> bool:
        """Gradual: each member is cut from the last one, trained, so the members are nested."""
        return self.mode == GRADUAL

    @property
    def step_train(self) -> TrainSettings:
        """Training at each pruning step: the member's budget split evenly over its steps."""
        return replace(self.train, tokens=math.ceil(self.train.tokens / self.prune_steps))


@dataclass(frozen=True)
class GenerationSettings:
    """Training text sampled from the dense model (synthetic.py)."""

    tokens: int = field(default=250_000, metadata=option("New tokens to write, prompts not counted."))
    seq_len: int = field(default=128, metadata=option(
        "Tokens per sample, prompt included: the profile's sequence length, as recovery trains on."))
    prompt_tokens: int = field(default=8, metadata=option("Tokens of --prompts text each sample continues."))
    batch_size: int = field(default=128, metadata=option("Samples generated together."))
    # 1 with top_p 1 samples the model's own distribution, what distillation matches
    temperature: float = field(default=1.0, metadata=option(
        "Sampling temperature; 1 samples the model's own distribution."))
    top_p: float = field(default=1.0, metadata=option("Nucleus sampling; 1 keeps every token."))
    precision: str = field(default="auto", metadata=option("Autocast while sampling, as --train-precision.",
                                                           choices=PRECISIONS))
    seed: int = field(default=0, metadata=option("Sampling seed."))

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
    method: str = field(default=ZIPLM, metadata=option(
        "ziplm, or a baseline planned on the same table and budgets.", choices=METHODS))
    num_samples: int = field(default=512, metadata=option("Calibration samples for the Hessians."))
    seed: int = field(default=0, metadata=option("Seed of the calibration sample and the search."))
    dampening: float = field(default=0.01, metadata=PYTHON_ONLY)
    calibration_inputs: str = field(default=DENSE, metadata=option(
        "dense: members' OBS weights from the dense model's inputs; sequential: members re-pruned on inputs of the "
        "model compressed so far; corrected: the same structures as dense, weights fit layer by layer on the "
        "compressed model's inputs to the dense model's output.", choices=CALIBRATION_INPUTS))
    block_errors: str = field(default=FISHER, metadata=option(
        "What the search weighs a block's OBS error by: fisher: its Fisher on the calibration loss, so blocks compare "
        "in loss units; relative: nothing (each block's error relative to its own output).", choices=BLOCK_ERRORS))
    search_evaluations: int = field(default=30, metadata=option("SPDY: models scored per target."))
    score_samples: int = field(default=128, metadata=option("Calibration samples each SPDY candidate is scored on."))
    score_on: str = field(default=CALIBRATION, metadata=option(
        "held-out: score candidates on calibration samples the Hessians did not see (drawn from the rest of --calib); "
        "calibration: on the Hessians' own samples.", choices=SCORE_ON))
    verify_rounds: int = field(default=20, metadata=option(
        "Interleaved rounds each member is timed in against the dense model (a miss is confirmed with twice as many "
        "more); raise it on a noisy machine."))
    max_replans: int = field(default=3, metadata=option(
        "Re-plans, at a tighter or looser budget, of a member measured outside [0.97, 1.10] x its target."))
    verify: bool = field(default=True, metadata=option(
        "Ship each member as planned, untimed and marked unverified (time them later with `ziplm-planner verify`).",
        flag="--no-verify"))
    machine_tolerance: float = field(default=1.5, metadata=option(
        "Verification stops when the dense model measures more than this many times slower or faster than the "
        "table predicts (beyond the table's own additivity error): the table is not this machine's, or the machine "
        "is busy."))
    onnx: bool = field(default=True, metadata=option("Skip the ONNX export of each member.", flag="--no-onnx"))
    cache_dir: Path = field(default_factory=lambda: default_cache_dir(), metadata=option(
        "Level-database cache [default: $XDG_CACHE_HOME/ziplm-planner, else ~/.cache/ziplm-planner].",
        show_default=False))
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
        if not self.machine_tolerance > 1:  # NaN too
            raise UserError(f"machine tolerance must be a number > 1, got {self.machine_tolerance}")
        if self.verify_rounds < 2 or self.max_replans < 0:
            raise UserError(f"verify rounds must be at least 2 and max re-plans at least 0, got {self.verify_rounds} "
                            f"and {self.max_replans}")
        if self.recovery.mode == GRADUAL and self.calibration_inputs == SEQUENTIAL:
            raise UserError("--recovery gradual re-plans each member on the last one's own inputs: "
                            "drop --calibration-inputs sequential")


    def recorded(self, kind: ModelKind) -> CompressSettings:
        """These settings as a command line can give them: --loss-weights gives every weight or leaves every one
        to the model kind, so weights set in part (in Python) are completed with the kind's."""
        train = self.recovery.train
        if train.weights == LossWeights(temperature=train.weights.temperature):
            return self
        train = replace(train, weights=train.weights.completed(kind.defaults))
        return replace(self, recovery=replace(self.recovery, train=train))


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ziplm-planner"


@dataclass(frozen=True)
class ProfileSettings:
    # the full size is timed too
    ffn_step: int = field(default=64, metadata=option("FFN sizes timed: multiples of this."))
    rounds: int = field(default=40, metadata=option("Interleaved repetitions per block."))
    warmup: int = field(default=3, metadata=PYTHON_ONLY)
    estimator: str = field(default=DEFAULT_ESTIMATOR, metadata=option(
        "Statistic of each block's timings taken as its cost (p10 stays stable on a busy machine).",
        choices=ESTIMATORS))
    # random whole models, small to large, checked against the prediction (plus dense)
    additivity_models: int = field(default=8, metadata=PYTHON_ONLY)
    additivity_rounds: int = field(default=15, metadata=PYTHON_ONLY)
    retries: int = field(default=2, metadata=option(
        "Profile again, up to this many times, while the table fails its trust checks (a noisy machine); the soundest "
        "is kept."))
    seed: int = field(default=0, metadata=PYTHON_ONLY)

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise UserError(f"estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if self.ffn_step < 1 or self.rounds < 2 or self.additivity_rounds < 2:
            raise UserError("ffn step must be >= 1 and rounds >= 2")
        if self.retries < 0:
            raise UserError(f"retries must be >= 0 (0: profile once, whatever the machine), not {self.retries}")
