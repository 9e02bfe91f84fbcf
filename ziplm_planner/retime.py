"""Re-time a shipped family: every member as it ships (its model.onnx on ONNX Runtime, its model.gguf
on llama.cpp, else its reloaded torch model) against its dense reference, on this machine with the family's spec."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .backends import backend_for
from .errors import UserError
from .export import load_pruned, load_pruned_tokenizer, read_record
from .family import read_report
from .kinds import kind_named
from .aliases import ModelSource
from .models import LoadedModel
from .profiler import workload
from .spec import InferenceSpec
from .timing import TimingStats, interleaved_samples, speedup_interval
from .verify import Measurement, verdict


def verify_family(folder: str | Path, rounds: int = 40, seed: int = 0) -> list[dict]:
    """Time every member of a family as it ships, against its dense reference, on this machine with
    the family's spec: each member's model.onnx (ONNX Runtime), model.gguf (llama.cpp) or its reloaded torch
    model. All
    members and the dense model are interleaved in the same rounds. Returns one row per member."""
    if rounds < 2:
        raise UserError(f"rounds must be at least 2, got {rounds}")
    folder = Path(folder)
    report = read_report(folder)
    try:
        spec, estimator = InferenceSpec(**report["metadata"]["spec"]), report["metadata"]["estimator"]
    except (KeyError, TypeError):
        raise UserError(f"{folder}/report.json records no inference spec: run `ziplm-planner compress` again") from None
    rows = report["members"]
    names = [row["folder"] for row in rows]
    if "dense" not in names:
        raise UserError(f"{folder}/report.json has no dense member to time against")
    backend, runners = backend_for(spec), {}
    with tempfile.TemporaryDirectory(prefix="ziplm-verify-") as tmp:
        for name in names:
            member = folder / name
            kind = kind_named(read_record(member)["kind"])
            loaded = LoadedModel(load_pruned(member), load_pruned_tokenizer(member), ModelSource(name, str(member)), kind)
            work = workload(loaded, spec, seed)
            runners[name] = backend.member_runner(member, loaded.model, work, spec, Path(tmp), name)
        samples = interleaved_samples(runners, rounds, 3, seed, backend.synchronizer(spec),
                                      description="timing the family")
    dense = TimingStats.from_samples(samples["dense"])
    results = []
    for row in rows:
        member = TimingStats.from_samples(samples[row["folder"]])
        measured = Measurement(member, dense, estimator, speedup_interval(samples["dense"], samples[row["folder"]],
                                                                         estimator, seed=seed), rounds, False, backend.timed)
        results.append({"folder": row["folder"], "target": row["target"], "speedup": measured.speedup,
                        "interval": measured.interval, "status": verdict(measured.speedup, row["target"]),
                        "reported_speedup": row.get("measured_speedup"), "member_ms": member.estimate(estimator),
                        "dense_ms": dense.estimate(estimator), "speedup_median": dense.median_ms / member.median_ms,
                        "timed": backend.timed})
    return results
