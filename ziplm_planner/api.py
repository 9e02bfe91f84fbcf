"""The Python API: what the CLI calls, and what a notebook calls.

The functions for a family are evaluate_family, verify_family and plot_families, not evaluate, verify and
plot: those are the package's modules, and `ziplm_planner.evaluate` must name one thing.

Light to import: each function checks the paths it is given before it imports the torch-heavy modules
that do the work, so that a wrong one is refused in a moment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .aliases import DEFAULT_MODEL, resolve_model
from .atomic import check_cache_dir, check_creatable_dir, check_writable
from .data import check_exists, read_dataset
from .family import FamilyReport, check_family_dir, check_reachable, parse_targets, read_report
from .settings import CompressSettings, GenerationSettings, ProfileSettings
from .spec import DECODERS_ONLY, InferenceSpec, check_exportable, check_gguf_type, check_runs_here

if TYPE_CHECKING:
    from .models import LoadedModel
    from .synthetic import GeneratedText
    from .table import LatencyTable


def _loaded(model: str | LoadedModel) -> LoadedModel:
    from .models import LoadedModel, load_model

    return model if isinstance(model, LoadedModel) else load_model(model)


def profile(model: str | LoadedModel = DEFAULT_MODEL, output: str | Path | None = None, *,
            spec: InferenceSpec | None = None, settings: ProfileSettings = ProfileSettings()) -> LatencyTable:
    """Profile `model` on this machine for `spec` (default: InferenceSpec(), on all cores); save the table
    to `output` if given."""
    spec = spec or InferenceSpec()
    if spec.mode == "decode":  # one new token per sequence: the table records a sequence length of 1
        spec = replace(spec, seq_len=1)
    check_runs_here(spec)  # these: fail now, not after loading the model and minutes of timing
    if output is not None:
        check_writable(Path(output))
    if isinstance(model, str):
        check_runs_model(resolve_model(model), spec)
    from .profiler import profile_model

    table = profile_model(_loaded(model), spec, settings)
    if output is not None:
        table.save(output)
    return table


def check_runs_model(source, spec: InferenceSpec) -> None:
    """Refuse, from its config, a model the spec's backend cannot run (an encoder on llama.cpp)."""
    if spec.backend in DECODERS_ONLY:
        from .models import load_config

        check_exportable(load_config(source).model_type, spec.gguf_type)


def compress(model: str | LoadedModel, table: str | Path | LatencyTable, targets: str | list[float],
             calibration: str | Path, output: str | Path, *, settings: CompressSettings | None = None,
             overwrite: bool = False) -> FamilyReport | None:
    """Compress `model` to each speedup target on the machine `table` was profiled on.

    Writes the family to `output` (one folder per target plus the dense reference, report.csv,
    report.json) and returns the FamilyReport; `overwrite` replaces a folder holding another family.
    `settings.recovery` distils every member after pruning (RecoverySettings, mode "oneshot" or
    "gradual"). Default settings: CompressSettings(), made at the call (the cache folder reads the
    environment). Returns None in the other processes of a distributed run."""
    settings = settings or CompressSettings()
    # everything checkable is checked before torch loads
    check_creatable_dir(Path(output))
    check_family_dir(Path(output), overwrite)
    check_cache_dir(settings.cache_dir)
    targets = parse_targets(targets)
    from .table import LatencyTable  # light: numpy and pandas

    table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
    check_reachable(targets, table)
    check_runs_here(table.spec)  # its members are timed here
    if isinstance(model, str):
        check_runs_model(resolve_model(model), table.spec)
    from .pipeline import compress_model

    return compress_model(_loaded(model), table, targets, str(calibration), Path(output), settings, overwrite)


def generate_text(model: str | LoadedModel, output: str | Path, prompts: str | Path | None = None, *,
                  settings: GenerationSettings = GenerationSettings()) -> GeneratedText:
    """Write training text sampled from `model` to `output` (.txt), each sample continuing the first tokens
    of a window of `prompts` (a text file) or starting from BOS; returns the GeneratedText. The file is
    RecoverySettings.train_data where there is no text to train on: real in-domain text recovers far more."""
    if prompts is not None:  # read twice: a missing, binary or empty file is refused before the model loads
        read_dataset(prompts, what="--prompts file")
    from .kinds import kind_of
    from .models import LoadedModel, load_config
    from .synthetic import check_output, check_writes_text, generate_text as sample, write_samples

    check_output(Path(output))
    if not isinstance(model, LoadedModel):  # an encoder is refused from its config, before seconds of loading
        check_writes_text(model, kind_of(load_config(resolve_model(model))))
    generated = sample(_loaded(model), settings, prompts)
    write_samples(Path(output), generated)
    return generated


def evaluate_family(family: str | Path, task: str, data: str | Path, backend: str = "torch",
                    max_tokens: int | None = None) -> dict[str, float]:
    """Score the dense reference and every member of `family` (a folder compress wrote) on `task` (stsb,
    classification, perplexity or fidelity) with the data file `data`, each member's torch model, its
    model.onnx (`backend` "onnxruntime") or its model.gguf ("llamacpp"); writes the scores into the family's report and returns
    {member folder: score}. `max_tokens` caps the tokens perplexity and fidelity read."""
    read_report(family)  # these two before torch loads
    check_exists(data, "--data file")
    from . import evaluate

    return evaluate.evaluate_family(family, task, data, backend=backend, max_tokens=max_tokens)


def export_gguf(family: str | Path, file_type: str = "f16") -> list[Path]:
    """Write model.gguf (llama.cpp) into every member of `family`, a Llama-style decoder family, at
    `file_type` (spec.GGUF_TYPES), with its source GGUF's tokenizer (else the member's tokenizer.json);
    returns the files written."""
    read_report(family)  # these two before torch loads
    check_gguf_type(file_type)
    from .gguf_export import export_family_gguf

    return export_family_gguf(Path(family), file_type)


def verify_family(family: str | Path, rounds: int = 40) -> list[dict]:
    """Re-time every member of `family` as it ships (its model.onnx on ONNX Runtime, model.gguf on llama.cpp,
    else its torch model) against the dense one, on this machine with the family's spec, in `rounds`
    interleaved repetitions; returns one row per member (speedup, its 90% interval, the reported speedup,
    status)."""
    read_report(family)  # before torch loads
    from . import retime

    return retime.verify_family(family, rounds=rounds)


def plot_families(families: Sequence[str | Path], output: str | Path, task: str | None = None) -> list[Path]:
    """Plot score (`task`, where a report has several) against measured speedup and latency for every
    family in `families` to `output` (.png or .svg, the other format written beside it); beside it, per
    family, what each member kept and, for recovered families, the distillation loss curves. Returns
    the files written."""
    from .plot import plot_frontier, plot_layers, plot_training, read_families, slug

    output = Path(output)
    data = read_families(families)
    written = plot_frontier(data, output, task=task)
    for family in data:
        for kind, draw in (("layers", plot_layers), ("training", plot_training)):
            written += draw(family, output.with_name(f"{output.stem}-{kind}-{slug(family.name)}{output.suffix or '.png'}"))
    return written
