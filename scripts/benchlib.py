"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

from ziplm_planner.settings import (CAUSAL_LM_DEFAULTS, OTHER_KIND_DEFAULTS, PERPLEXITY_SEQ_LEN, PRECISIONS,
                                    LossWeights, ProfileSettings, TrainSettings, default)


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the script exits: a level-database cache is 0.3-0.6 GB for
    SmolLM2, and a dozen runs left behind once filled the development VM's disk."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def parse_loss_weights(text: str) -> LossWeights:
    """'1,1,0:2' -> the task, KL and SquareHead weights, and after a colon the temperature (default if none)."""
    weights, _, temperature = text.partition(":")
    return LossWeights.parse(weights, float(temperature or default(LossWeights, "temperature")))


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the inference spec a profiling benchmark times (the bundled model, batch 8 x 128),
    and --rounds, the profiler's default."""
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=default(ProfileSettings, "rounds"))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """--learning-rate, --precision, and --batch-size and --seq-len, left to the model by default as the
    CLI leaves them: the CLI's defaults throughout."""
    parser.add_argument("--learning-rate", type=float, default=default(TrainSettings, "learning_rate"))
    parser.add_argument("--precision", choices=PRECISIONS, default=default(TrainSettings, "precision"),
                        help="training autocast (accelerate fixes it per process: one for a whole run)")
    parser.add_argument("--batch-size", type=int, default=default(TrainSettings, "batch_size"),
                        help=f"samples per step (default: the CLI's, {CAUSAL_LM_DEFAULTS.batch_size} window for "
                             f"causal LMs, {OTHER_KIND_DEFAULTS.batch_size} sentences otherwise)")
    parser.add_argument("--seq-len", type=int, default=default(TrainSettings, "seq_len"),
                        help=f"tokens per training sample (default: the CLI's, {PERPLEXITY_SEQ_LEN} for causal LMs)")
