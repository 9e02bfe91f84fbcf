"""The Python API: what the CLI calls, and what a notebook calls."""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import check_creatable_dir, check_writable
from .models import LoadedModel, load_model
from .profiler import profile_model
from .spec import InferenceSpec
from .settings import CompressSettings, GenerationSettings, ProfileSettings, RecoverySettings, TrainSettings, default
from .table import LatencyTable


def _loaded(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def profile(model: str | LoadedModel = "minilm", output: str | Path | None = None, *, backend: str = "torch",
            batch_size: int = 8, seq_len: int = 128, mode: str = "prefill", context: int = 0,
            threads: int | None = None, device: str = "cpu", dtype: str = "float32",
            ffn_step: int = default(ProfileSettings, "ffn_step"), rounds: int = default(ProfileSettings, "rounds"),
            estimator: str = default(ProfileSettings, "estimator"), retries: int = default(ProfileSettings, "retries"),
            seed: int = default(ProfileSettings, "seed")) -> LatencyTable:
    """Profile `model` on this machine for one inference spec; save the table to `output` if given."""
    spec = InferenceSpec(backend=backend, device=device, dtype=dtype, threads=threads or os.cpu_count(),
                         batch_size=batch_size, seq_len=1 if mode == "decode" else seq_len, mode=mode, context=context)
    settings = ProfileSettings(ffn_step=ffn_step, rounds=rounds, estimator=estimator, retries=retries, seed=seed)
    if output is not None:
        check_writable(Path(output))  # fail now, not after minutes of timing
    table = profile_model(_loaded(model), spec, settings)
    if output is not None:
        table.save(output)
    return table


def compress(model: str | LoadedModel, table: str | Path | LatencyTable, targets: str | list[float],
             calibration: str | Path, output: str | Path, *, method: str = default(CompressSettings, "method"),
             num_samples: int = default(CompressSettings, "num_samples"), seed: int = default(CompressSettings, "seed"),
             calibration_inputs: str = default(CompressSettings, "calibration_inputs"),
             block_errors: str = default(CompressSettings, "block_errors"),
             search_evaluations: int = default(CompressSettings, "search_evaluations"),
             score_samples: int = default(CompressSettings, "score_samples"),
             score_on: str = default(CompressSettings, "score_on"),
             verify_rounds: int = default(CompressSettings, "verify_rounds"),
             max_replans: int = default(CompressSettings, "max_replans"), onnx: bool = True, overwrite: bool = False,
             cache_dir: str | Path | None = None, recovery: str = default(RecoverySettings, "mode"),
             train_data: str | Path | None = None, train: TrainSettings | None = None,
             prune_steps: int = default(RecoverySettings, "prune_steps")):
    """Compress `model` to each speedup target on the machine `table` was profiled on.

    Writes the family to `output` (one folder per target plus the dense reference, report.csv,
    report.json) and returns the FamilyReport. `recovery="oneshot"` distils every member from the
    dense model on `train_data` (default: the calibration file) with the `train` settings; `"gradual"`
    cuts each member from the last one distilled, in `prune_steps` prune-and-distil steps."""
    from .pipeline import check_reachable, compress_model, parse_targets

    targets = parse_targets(targets)
    table = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
    check_reachable(targets, table)  # this and the output: fail now, not after loading the model
    check_creatable_dir(Path(output))
    settings = CompressSettings(method=method, num_samples=num_samples, seed=seed, calibration_inputs=calibration_inputs,
                                block_errors=block_errors,
                                search_evaluations=search_evaluations, score_samples=score_samples, score_on=score_on,
                                verify_rounds=verify_rounds, max_replans=max_replans, onnx=onnx,
                                recovery=RecoverySettings(recovery, None if train_data is None else str(train_data),
                                                          train or TrainSettings(), prune_steps),
                                **({"cache_dir": Path(cache_dir)} if cache_dir else {}))
    return compress_model(_loaded(model), table, targets, str(calibration), Path(output), settings, overwrite)


def generate_text(model: str | LoadedModel, output: str | Path, prompts: str | Path | None = None, *,
                  settings: GenerationSettings = GenerationSettings()):
    """Write training text sampled from `model` to `output` (.txt), each sample continuing the first tokens
    of a window of `prompts` (a text file) or starting from BOS; returns the GeneratedText. The file is for
    compress(..., train_data=...) where there is no text to train on: real in-domain text recovers far more."""
    from .models import load_config, model_kind, resolve_model
    from .synthetic import check_output, check_writes_text, generate_text as sample, write_samples

    check_output(Path(output))
    if not isinstance(model, LoadedModel):  # an encoder is refused from its config, before seconds of loading
        check_writes_text(model, model_kind(load_config(resolve_model(model))))
    generated = sample(_loaded(model), settings, prompts)
    write_samples(Path(output), generated)
    return generated
