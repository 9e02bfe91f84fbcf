"""What the benchmark scripts share."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from ziplm_planner.settings import LossWeights, default


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
