"""The Python API: what the CLI calls, and what a notebook calls."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .aliases import DEFAULT_MODEL
from .atomic import check_creatable_dir, check_writable
from .models import LoadedModel, load_model
from .profiler import profile_model
from .settings import CompressSettings, GenerationSettings, ProfileSettings
from .spec import InferenceSpec, check_runs_here
from .table import LatencyTable


def _loaded(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def profile(model: str | LoadedModel = DEFAULT_MODEL, output: str | Path | None = None, *,
            spec: InferenceSpec | None = None, settings: ProfileSettings = ProfileSettings()) -> LatencyTable:
    """Profile `model` on this machine for `spec` (default: InferenceSpec(), on all cores); save the table
    to `output` if given."""
    spec = spec or InferenceSpec()
    if spec.mode == "decode":  # one new token per sequence: the table records a sequence length of 1
        spec = replace(spec, seq_len=1)
    check_runs_here(spec)  # this and the output: fail now, not after loading the model and minutes of timing
    if output is not None:
        check_writable(Path(output))
    table = profile_model(_loaded(model), spec, settings)
    if output is not None:
        table.save(output)
    return table


def compress(model: str | LoadedModel, table: str | Path | LatencyTable, targets: str | list[float],
             calibration: str | Path, output: str | Path, *, settings: CompressSettings | None = None,
             overwrite: bool = False):
    """Compress `model` to each speedup target on the machine `table` was profiled on.

    Writes the family to `output` (one folder per target plus the dense reference, report.csv,
    report.json) and returns the FamilyReport; `overwrite` replaces a folder holding another family.
    `settings.recovery` distils every member after pruning (RecoverySettings, mode "oneshot" or
    "gradual"). Default settings: CompressSettings(), made at the call (the cache folder reads the
    environment)."""
    from .database import check_cache_dir
    from .familydir import check_family_dir
    from .pipeline import check_reachable, compress_model, parse_targets

    settings = settings or CompressSettings()
    targets = parse_targets(targets)
    table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
    check_reachable(targets, table)  # this and the output: fail now, not after loading the model
    check_creatable_dir(Path(output))
    check_family_dir(Path(output), overwrite)
    check_cache_dir(settings.cache_dir)
    return compress_model(_loaded(model), table, targets, str(calibration), Path(output), settings, overwrite)


def generate_text(model: str | LoadedModel, output: str | Path, prompts: str | Path | None = None, *,
                  settings: GenerationSettings = GenerationSettings()):
    """Write training text sampled from `model` to `output` (.txt), each sample continuing the first tokens
    of a window of `prompts` (a text file) or starting from BOS; returns the GeneratedText. The file is
    RecoverySettings.train_data where there is no text to train on: real in-domain text recovers far more."""
    from .data import read_dataset
    from .kinds import kind_of
    from .models import load_config, resolve_model
    from .synthetic import check_output, check_writes_text, generate_text as sample, write_samples

    check_output(Path(output))
    if prompts is not None:  # read twice: a missing, binary or empty file is refused before the model loads
        read_dataset(prompts, what="--prompts file")
    if not isinstance(model, LoadedModel):  # an encoder is refused from its config, before seconds of loading
        check_writes_text(model, kind_of(load_config(resolve_model(model))))
    generated = sample(_loaded(model), settings, prompts)
    write_samples(Path(output), generated)
    return generated
