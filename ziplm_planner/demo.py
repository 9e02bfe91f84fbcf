"""The demo: the whole pipeline on the bundled model, on this machine, with no data files.

Calibration and held-out text come from Python itself: the docstrings of standard-library
modules, split into sentences. Profile -> compress -> evaluate -> plot, in a few minutes.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from .aliases import DEFAULT_MODEL
from .atomic import atomic_write_text, check_creatable_dir
from .errors import UserError
from .progress import stage
from .settings import ProfileSettings
from .spec import ENCODER_BACKENDS, InferenceSpec

if TYPE_CHECKING:
    from .adapters import ModelShape

STDLIB_MODULES = ("argparse", "asyncio", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime",
                  "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "heapq", "http.client",
                  "inspect", "io", "itertools", "json", "logging", "mailbox", "os", "pathlib", "pickle", "random", "re",
                  "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
                  "threading", "unittest", "urllib.request", "uuid", "zipfile")
PROFILE = ProfileSettings(rounds=20)  # half the default rounds: the demo should take minutes
CALIBRATION, HELD_OUT, FAMILY = "calibration.txt", "heldout.txt", "family"
FRONTIER, LAYERS = "frontier.png", "layers.png"
# every file the demo writes into its folder (a plot's .svg twin beside it), and the family folder it rebuilds
DEMO_FILES = (CALIBRATION, HELD_OUT, *(f"profile-{backend}.json" for backend in ENCODER_BACKENDS), FRONTIER, "frontier.svg",
              LAYERS, "layers.svg")


def python_sentences() -> list[str]:
    """Sentences of 6 to 60 words from standard-library docstrings, deduplicated, in a fixed order."""
    seen, sentences = set(), []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module)] + [inspect.getdoc(obj) for _, obj in sorted(vars(module).items())
                                           if (inspect.isfunction(obj) or inspect.isclass(obj))
                                           and getattr(obj, "__module__", "") == module.__name__]
        for doc in filter(None, docs):
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 6 <= len(sentence.split()) <= 60 and sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


def write_demo_texts(folder: Path, held_out: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """calibration.txt and heldout.txt: disjoint random splits of the standard-library sentences."""
    sentences = python_sentences()
    random.Random(seed).shuffle(sentences)
    calibration = atomic_write_text(folder / CALIBRATION, "\n".join(sentences[held_out:]) + "\n")
    heldout = atomic_write_text(folder / HELD_OUT, "\n".join(sentences[:held_out]) + "\n")
    return calibration, heldout


def run_demo(output: Path, targets=(1.5, 2.0, 3.0), backend: str = "onnxruntime", stsb: str | None = None) -> dict:
    """Profile, compress, evaluate and plot the bundled model; returns the paths written. The demo's
    family folder is rebuilt on every run."""
    targets = list(targets)
    check_demo_folder(output)  # before anything starts: bad input is one line
    check_possible(targets, InferenceSpec(backend=backend))
    if stsb:
        check_stsb(stsb)
    with stage("demo", f"{DEFAULT_MODEL} to {', '.join(f'{t:g}x' for t in targets)} on {backend}, into {output}"):
        return _run_demo(output, targets, backend, stsb)


def _run_demo(output: Path, targets: list[float], backend: str, stsb: str | None) -> dict:
    from . import api
    from .evaluate import evaluate_family
    from .models import load_model
    from .plot import plot_frontier, plot_layers, read_family

    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(DEFAULT_MODEL)
    with stage("demo texts", "sentences from the docstrings of Python's standard library"):
        calibration, heldout = write_demo_texts(output)
    table_path = output / f"profile-{backend}.json"  # one of DEMO_FILES
    api.profile(loaded, table_path, spec=InferenceSpec(backend=backend), settings=PROFILE)
    family = output / FAMILY
    with stage("compress", "the dense reference and a member per target"):
        api.compress(loaded, table_path, targets, calibration, family, overwrite=True)
    evaluate_family(family, "fidelity", str(heldout))
    if stsb:
        evaluate_family(family, "stsb", stsb)
    data = read_family(family)
    plots = plot_frontier([data], output / FRONTIER, task="stsb" if stsb else "fidelity")
    plots += plot_layers(data, output / LAYERS)
    return {"table": table_path, "family": family, "report": family / "report.csv", "plots": plots}


def check_demo_folder(output: Path) -> None:
    """The demo writes its texts, table and plots into `output` and rebuilds the family in it: refuse a
    folder that holds anything else (the user's files), as compress refuses a folder of other files."""
    check_creatable_dir(output)
    if not output.is_dir():
        return
    foreign = sorted(path.name for path in output.iterdir() if not written_by_demo(path))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"output folder {output} holds files the demo did not write ({listed}): "
                        "give a new or empty folder with -o")


def written_by_demo(path: Path) -> bool:
    """One of the demo's files (or the temporary file of one, left by a killed run), or its family folder:
    empty, or a family of the bundled model."""
    from .aliases import resolve_model
    from .family import manifest_source

    if path.name == FAMILY and path.is_dir():
        source = manifest_source(path)
        return not any(path.iterdir()) or (isinstance(source, dict) and
                                           source.get("model") == resolve_model(DEFAULT_MODEL).location)
    return path.is_file() and any(fnmatch(path.name, name) or fnmatch(path.name, f".{name}.*.tmp")
                                  for name in DEMO_FILES)


def speedup_ceiling(shape: ModelShape, tokens: int) -> float:
    """A speedup no machine can give a model of `shape`: the multiply-adds of its layers per token (counted
    generously: every projection full size, a gated FFN, attention over `tokens` positions) over those of
    one FFN neuron, the smallest structure a member keeps. A table's maximum speedup, measured with the
    fixed part, is far below it (MiniLM: 53x and 78x in the shipped tables, against 19,200x)."""
    width = shape.num_heads * shape.head_dim
    layer = 4 * shape.hidden_size * width + 2 * tokens * width + 3 * shape.hidden_size * shape.intermediate_size
    return shape.num_layers * layer / (2 * shape.hidden_size)


def check_possible(targets: list[float], spec: InferenceSpec) -> None:
    """Refuse targets past the bundled model's arithmetic before profiling; the table made by profiling
    then refuses those past its measured maximum, as compress does."""
    from .adapters import model_shape
    from .aliases import resolve_model
    from .models import load_config

    ceiling = speedup_ceiling(model_shape(load_config(resolve_model(DEFAULT_MODEL))), spec.seq_len + spec.context)
    if max(targets) > ceiling:
        raise UserError(f"target {max(targets):g}x is beyond what {DEFAULT_MODEL} can reach on any machine (one "
                        f"neuron left of its layers is at most {ceiling:,.0f}x less arithmetic): "
                        "choose smaller targets")


def check_stsb(path: str) -> None:
    """The --stsb file is an STS-B file: read now, not after minutes of profiling and compressing."""
    from .evaluate import task_named

    task_named("stsb").read(path)
