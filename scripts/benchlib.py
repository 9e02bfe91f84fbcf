"""What the benchmark scripts share: arguments whose defaults are the library's, settings made from them,
and scratch folders."""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

from ziplm_planner.aliases import DEFAULT_MODEL
from ziplm_planner.kinds import CAUSAL_LM
from ziplm_planner.settings import (CAUSAL_LM_DEFAULTS, OTHER_KIND_DEFAULTS, PERPLEXITY_SEQ_LEN, PRECISIONS,
                                    CompressSettings, LossWeights, ProfileSettings, TrainSettings)
from ziplm_planner.spec import InferenceSpec


def task_of(loaded) -> str:
    """The task the benchmarks score a model on: perplexity for a causal LM, else STS-B."""
    return "perplexity" if loaded.kind is CAUSAL_LM else "stsb"


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script exits: a level-database cache is 0.3-0.6 GB for
    SmolLM2, and a dozen runs left behind once filled the development VM's disk."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def parse_loss_weights(text: str) -> LossWeights:
    """'1,1,0:2' -> the task, KL and SquareHead weights, and after a colon the temperature (default if none)."""
    weights, _, temperature = text.partition(":")
    return LossWeights.parse(weights, **({"temperature": float(temperature)} if temperature else {}))


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the inference spec a profiling benchmark times (the bundled model, the default batch and
    sequence length), and --rounds: the CLI's defaults."""
    spec = InferenceSpec()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=spec.batch_size)
    parser.add_argument("--seq-len", type=int, default=spec.seq_len)
    parser.add_argument("--rounds", type=int, default=ProfileSettings().rounds)


def profile_spec(args: argparse.Namespace, **fields) -> InferenceSpec:
    """The spec add_profile_arguments' flags give (on all cores, as the CLI's), with `fields`."""
    return InferenceSpec(batch_size=args.batch_size, seq_len=args.seq_len, **fields)


def add_compress_arguments(parser: argparse.ArgumentParser, targets: str) -> None:
    """--model, --profile, --targets (default `targets`), --calib, and the planner's sample counts, the CLI's
    defaults."""
    defaults = CompressSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--targets", default=targets)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--search-evaluations", type=int, default=defaults.search_evaluations)
    parser.add_argument("--score-samples", type=int, default=defaults.score_samples)


def compress_settings(args: argparse.Namespace, cache_dir: Path, **fields) -> CompressSettings:
    """The settings add_compress_arguments' flags give, with a level-database cache and `fields`."""
    return CompressSettings(num_samples=args.num_samples, search_evaluations=args.search_evaluations,
                            score_samples=args.score_samples, cache_dir=cache_dir, **fields)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """--learning-rate, --precision, and --batch-size and --seq-len, left to the model by default as the
    CLI leaves them: the CLI's defaults throughout."""
    defaults = TrainSettings()
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="training autocast (accelerate fixes it per process: one for a whole run)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help=f"samples per step (default: the CLI's, {CAUSAL_LM_DEFAULTS.batch_size} window for "
                             f"causal LMs, {OTHER_KIND_DEFAULTS.batch_size} sentences otherwise)")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len,
                        help=f"tokens per training sample (default: the CLI's, {PERPLEXITY_SEQ_LEN} for causal LMs)")
