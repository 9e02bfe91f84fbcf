"""The demo: the whole pipeline on the bundled model, on this machine, with no data files.

Calibration and held-out text come from Python itself: the docstrings of standard-library
modules, split into sentences. Profile -> compress -> evaluate -> plot, in a few minutes.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from pathlib import Path

from .aliases import DEFAULT_MODEL
from .atomic import atomic_write_text, check_creatable_dir
from .progress import stage
from .settings import ProfileSettings

STDLIB_MODULES = ("argparse", "asyncio", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime",
                  "decimal", "difflib", "email", "enum", "fractions", "functools", "gzip", "heapq", "http.client",
                  "inspect", "io", "itertools", "json", "logging", "mailbox", "os", "pathlib", "pickle", "random", "re",
                  "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
                  "threading", "unittest", "urllib.request", "uuid", "zipfile")
PROFILE = ProfileSettings(rounds=20)  # half the default rounds: the demo should take minutes


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
    calibration = atomic_write_text(folder / "calibration.txt", "\n".join(sentences[held_out:]) + "\n")
    heldout = atomic_write_text(folder / "heldout.txt", "\n".join(sentences[:held_out]) + "\n")
    return calibration, heldout


def run_demo(output: Path, targets=(1.5, 2.0, 3.0), backend: str = "onnxruntime", stsb: str | None = None) -> dict:
    """Profile, compress, evaluate and plot the bundled model; returns the paths written. The demo's
    family folder is rebuilt on every run."""
    targets = list(targets)
    check_creatable_dir(output)  # before anything starts: bad input is one line
    with stage("demo", f"{DEFAULT_MODEL} to {', '.join(f'{t:g}x' for t in targets)} on {backend}, into {output}"):
        return _run_demo(output, targets, backend, stsb)


def _run_demo(output: Path, targets: list[float], backend: str, stsb: str | None) -> dict:
    from . import api
    from .spec import InferenceSpec
    from .evaluate import evaluate_family
    from .models import load_model
    from .plot import plot_frontier, plot_layers, read_family

    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(DEFAULT_MODEL)
    with stage("demo texts", "sentences from the docstrings of Python's standard library"):
        calibration, heldout = write_demo_texts(output)
    table_path = output / f"profile-{backend}.json"
    api.profile(loaded, table_path, spec=InferenceSpec(backend=backend), settings=PROFILE)
    family = output / "family"
    with stage("compress", "the dense reference and a member per target"):
        api.compress(loaded, table_path, targets, calibration, family, overwrite=True)
    evaluate_family(family, "fidelity", str(heldout))
    if stsb:
        evaluate_family(family, "stsb", stsb)
    data = read_family(family)
    plots = plot_frontier([data], output / "frontier.png", task="stsb" if stsb else "fidelity")
    plots += plot_layers(data, output / "layers.png")
    return {"table": table_path, "family": family, "report": family / "report.csv", "plots": plots}
