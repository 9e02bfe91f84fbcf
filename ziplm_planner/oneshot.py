"""One-shot ZipLM: a family of pruned models, one per speedup target, each measured to meet it.

calibrate -> level database (cached) -> per target: SPDY search over the DP -> stitch + surgery
-> measure against the dense model on the table's backend -> re-plan tighter if it misses.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import model_shape
from .atomic import atomic_write_text
from .backends import build_runner, synchronizer
from .calibrate import Calibration, CalibrationLoss, load_calibration
from .database import DENSE, SEQUENTIAL, LevelDatabase, build_database, cached_database, database_key, stitch, stitch_sequential
from .environment import library_versions, machine_info, now
from .errors import UserError
from .export import save_member
from .family import FAMILY_FORMAT, report_csv
from .models import LoadedModel
from .profiler import workload
from .progress import bar, stage
from .search import spdy_search, total_time
from .surgery import PruningPlan, count_parameters
from .table import LatencyTable
from .timing import TimingStats, time_interleaved

log = logging.getLogger(__name__)

SPEEDUP_TOLERANCE = 0.97  # a member below 0.97 x target is re-planned with a tighter budget
OVERSHOOT = 1.10  # one above 1.10 x target is re-planned with a looser budget


ZIPLM = "ziplm"
METHODS = (ZIPLM, "magnitude", "uniform", "layerdrop", "kwon")  # the others: baselines.py, same table and budgets


@dataclass(frozen=True)
class CompressSettings:
    method: str = ZIPLM
    num_samples: int = 512
    seed: int = 0
    dampening: float = 0.01
    calibration_inputs: str = DENSE  # or SEQUENTIAL: members re-pruned on inputs of the compressed model
    search_evaluations: int = 30  # SPDY: stitched models scored per target
    score_samples: int = 128  # calibration samples the SPDY score uses
    verify_rounds: int = 20
    max_replans: int = 3
    onnx: bool = True
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.calibration_inputs not in (DENSE, SEQUENTIAL):
            raise UserError(f"calibration inputs must be {DENSE} or {SEQUENTIAL}, got {self.calibration_inputs!r}")
        if self.num_samples < 1 or self.search_evaluations < 1 or self.score_samples < 1:
            raise UserError("number of samples, search evaluations and score samples must be at least 1")


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ziplm-planner"


def parse_targets(text: str | list) -> list[float]:
    """'1.5,2,3' -> [1.5, 2.0, 3.0]; every target a number > 1."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        targets = sorted({float(t) for t in items if str(t).strip()})
    except ValueError:
        raise UserError(f"targets must be numbers separated by commas, got {text!r}") from None
    if not targets or any(t <= 1 for t in targets):
        raise UserError(f"every speedup target must be > 1, got {text!r}")
    return targets


def member_name(target: float) -> str:
    return "dense" if target == 1 else f"x{target:g}"


@dataclass
class MemberResult:
    target: float
    folder: str
    plan: PruningPlan
    predicted_ms: float
    measured: TimingStats
    dense: TimingStats  # the dense model, timed interleaved with this member
    estimator: str
    calibration_loss: float
    parameters: int
    replans: int = 0

    @property
    def speedup(self) -> float:
        return self.dense.estimate(self.estimator) / self.measured.estimate(self.estimator)

    @property
    def met(self) -> bool:
        return self.target == 1 or self.speedup >= SPEEDUP_TOLERANCE * self.target

    def row(self, dense_predicted_ms: float) -> dict:
        counts = self.plan.kept_counts()
        return {
            "target": self.target, "folder": self.folder, "met_target": self.met,
            "predicted_ms": round(self.predicted_ms, 4), "predicted_speedup": round(dense_predicted_ms / self.predicted_ms, 4),
            "measured_ms": round(self.measured.estimate(self.estimator), 4), "measured_speedup": round(self.speedup, 4),
            "measured_median_ms": round(self.measured.median_ms, 4), "measured_p10_ms": round(self.measured.p10_ms, 4),
            "measured_p90_ms": round(self.measured.p90_ms, 4), "dense_ms": round(self.dense.estimate(self.estimator), 4),
            "dense_median_ms": round(self.dense.median_ms, 4),
            "speedup_median": round(self.dense.median_ms / self.measured.median_ms, 4),
            "parameters": self.parameters, "calibration_loss": self.calibration_loss, "replans": self.replans,
            "kept_attention": [a for a, _ in counts], "kept_ffn": [f for _, f in counts],
        }


@dataclass
class FamilyReport:
    rows: list[dict]
    metadata: dict

    def to_dict(self) -> dict:
        return {"format": FAMILY_FORMAT, "metadata": self.metadata, "members": self.rows}

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / "report.csv", report_csv(self.rows))
        atomic_write_text(folder / "report.json", json.dumps(self.to_dict(), indent=1))


# --- the family directory ------------------------------------------------------------------------


def prepare_family_dir(output: Path, manifest: dict, overwrite: bool) -> None:
    """Refuse a directory holding something else unless `overwrite`; record what this run makes."""
    manifest_path = output / "family.json"
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file: give a directory for the family")
    if output.exists() and any(output.iterdir()):
        same = manifest_path.exists() and json.loads(manifest_path.read_text()).get("source") == manifest["source"]
        if not same and not overwrite:
            raise UserError(f"output directory {output} already holds a different family or other files: "
                            "use --overwrite or another -o")
        if overwrite and not same:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))


# --- measuring -----------------------------------------------------------------------------------


class Verifier:
    """Times models against the dense one, interleaved, on the table's backend and spec."""

    def __init__(self, loaded: LoadedModel, table: LatencyTable, rounds: int, workdir: Path, seed: int = 0):
        self.table, self.rounds, self.workdir, self.seed = table, rounds, workdir, seed
        self.work = workload(loaded, table.spec, seed)
        self.dense = build_runner(self.work.call(loaded.model), self.work.inputs, table.spec, workdir, "dense")
        self.count = 0

    def measure(self, model) -> tuple[TimingStats, TimingStats]:
        self.count += 1
        runner = build_runner(self.work.call(model), self.work.inputs, self.table.spec, self.workdir, f"m{self.count}")
        stats = time_interleaved({"dense": self.dense, "member": runner}, self.rounds, 3, self.seed,
                                 synchronizer(self.table.spec))
        return stats["member"], stats["dense"]


# --- planning one member ---------------------------------------------------------------------------


class Planner:
    """ZipLM: the SPDY-searched DP over the level database, stitched with OBS-updated weights."""

    def __init__(self, loaded: LoadedModel, table: LatencyTable, db: LevelDatabase, calibration: Calibration,
                 settings: CompressSettings, score_loss: CalibrationLoss):
        self.loaded, self.table, self.db, self.calibration, self.settings = loaded, table, db, calibration, settings
        self.problem = db.search_blocks(table)
        self.score_loss = score_loss

    def search(self, budget_ms: float) -> list[tuple[int, int]]:
        """Kept (attention, FFN) per layer minimising the learned-weighted error within `budget_ms`."""
        block_budget = self.table.block_budget(budget_ms)

        def score(choice: list[int]) -> float:
            model, _ = stitch(self.loaded.model, self.db, self.db.kept_counts(self.problem, choice))
            return self.score_loss(model)

        with bar(total=self.settings.search_evaluations, desc=f"search {budget_ms:.1f} ms", leave=False) as shown:
            result = spdy_search(self.problem, block_budget, score, evaluations=self.settings.search_evaluations,
                                 seed=self.settings.seed, progress=lambda n, best: shown.update(n - shown.n))
        log.info("budget %.2f ms: blocks %.2f ms, score %.5f after %d evaluations", budget_ms,
                 total_time(self.problem, result.choice), result.score, result.evaluations)
        return self.db.kept_counts(self.problem, result.choice)

    def build(self, budget_ms: float):
        """(pruned model, plan, kept counts) for a model predicted to run in `budget_ms`."""
        counts = self.search(budget_ms)
        if self.settings.calibration_inputs == SEQUENTIAL:
            return (*stitch_sequential(self.loaded.model, self.db, counts, self.calibration), counts)
        return (*stitch(self.loaded.model, self.db, counts), counts)


def verified_member(planner, target: float, table: LatencyTable, verifier: Verifier, score_loss: CalibrationLoss,
                    max_replans: int) -> tuple[MemberResult, object]:
    """Plan with any planner (`build(budget_ms) -> (model, plan, counts)`), build and measure. A member
    below 0.97 x target is re-planned with a budget tightened by the shortfall; one past 1.10 x target
    (accuracy left on the table) with a looser budget, kept only if it still meets the target."""
    budget = table.dense_ms / target
    floor = table.predict([(0, 0)] * table.shape.num_layers)
    best = None
    for attempt in range(max_replans + 1):
        model, plan, counts = planner.build(budget)
        measured, dense = verifier.measure(model)
        result = MemberResult(target, member_name(target), plan, table.predict(counts), measured, dense,
                              table.estimator, score_loss(model), count_parameters(model), attempt)
        if result.met:
            if best is None or result.speedup < best[0].speedup:
                best = (result, model)
            if result.speedup <= OVERSHOOT * target:
                break
        elif best is not None:
            break  # a looser budget missed: keep the member that met the target
        budget = max(floor, budget * result.speedup / target * (1.0 if result.met else 0.99))
        log.info("x%g measured %.3fx: re-planning with %.2f ms", target, result.speedup, budget)
    if best is None:
        log.warning("x%g: measured speedup %.3fx is below %.2f x target after %d re-plans", target, result.speedup,
                    SPEEDUP_TOLERANCE, max_replans)
        return result, model
    best[0].replans = attempt  # re-plans made, including a looser one that was not kept
    return best


# --- the whole run -------------------------------------------------------------------------------------


def calibration_length(table: LatencyTable) -> int:
    """Tokens per calibration sample: the table's sequence length, or for decode its context (capped,
    since the Hessians need many samples more than long ones)."""
    return table.spec.seq_len if table.spec.mode == "prefill" else min(table.spec.context, 512)


def model_fingerprint(loaded: LoadedModel) -> dict:
    location = Path(loaded.source.location)
    files = {}
    if location.is_dir():
        files = {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in sorted(location.iterdir())
                 if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")}
    return {"location": str(location), "gguf": loaded.source.gguf_file, "files": files,
            "config": json.loads(loaded.model.config.to_json_string(use_diff=False))}


def compress_model(loaded: LoadedModel, table: LatencyTable, targets: list[float], calibration_path: str,
                   output: Path, settings: CompressSettings = CompressSettings(), overwrite: bool = False) -> FamilyReport:
    started = time.perf_counter()
    shape = model_shape(loaded.model.config)
    table.check_compatible(shape, source="latency table")
    too_fast = [t for t in targets if t > table.max_speedup]
    if too_fast:
        raise UserError(f"target {max(too_fast):g}x is beyond this table's maximum speedup {table.max_speedup:.2f}x "
                        "(every layer removed): choose smaller targets")
    torch.set_num_threads(table.spec.threads)
    torch.manual_seed(settings.seed)
    with stage("calibration", f"{settings.num_samples} samples of {calibration_length(table)} tokens, "
                              f"from {calibration_path}"):
        calibration = load_calibration(loaded, calibration_path, calibration_length(table), settings.num_samples,
                                       settings.seed)
    fingerprint = model_fingerprint(loaded)
    manifest = {"format": FAMILY_FORMAT, "source": {"model": fingerprint["location"], "method": settings.method,
                                                    "table": table.spec.to_dict(), "shape": asdict(shape)}}
    prepare_family_dir(output, manifest, overwrite)

    score_loss = CalibrationLoss(loaded.model, loaded.kind, calibration.batches(settings.score_samples))
    planning = {}
    if settings.method == ZIPLM:
        key = database_key(fingerprint, calibration, table, settings.dampening, settings.num_samples,
                           settings.seed)
        with stage("level database", f"{shape.num_layers} layers, {calibration.num_samples} samples") as step:
            db = cached_database(settings.cache_dir, key,
                                 lambda: build_database(loaded.model, calibration, table, settings.dampening))
            step.outcome = "from the cache" if db.metadata.get("cached") else f"cached in {settings.cache_dir}"
        planning["level_database"] = {**db.metadata, "seconds_this_run": round(time.perf_counter() - started, 2)}
        planner = Planner(loaded, table, db, calibration, settings, score_loss)
    else:
        from .baselines import BaselinePlanner

        with stage(f"{settings.method} baseline"):
            planner = BaselinePlanner(settings.method, loaded, table, calibration, settings.seed)
        planning["baseline_setup_seconds"] = round(time.perf_counter() - started, 2)
    results, planning_seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="ziplm-verify-") as tmp:
        with stage("dense reference", f"timed on {table.spec.backend}"):
            verifier = Verifier(loaded, table, settings.verify_rounds, Path(tmp), settings.seed)
            dense_measured, dense_again = verifier.measure(loaded.model)
        dense = MemberResult(1.0, "dense", PruningPlan.dense(shape), table.dense_ms, dense_measured, dense_again,
                             table.estimator, score_loss(loaded.model), count_parameters(loaded.model))
        save_member(output / "dense", loaded.model, loaded.tokenizer, dense.plan, loaded.kind,
                    {"target": 1.0}, onnx=settings.onnx)
        results.append(dense)
        for number, target in enumerate(targets, 1):
            with stage(f"member {number} of {len(targets)}", f"target {target:g}x") as step:
                member_started = time.perf_counter()
                result, model = verified_member(planner, target, table, verifier, score_loss, settings.max_replans)
                planning_seconds += time.perf_counter() - member_started
                save_member(output / result.folder, model, loaded.tokenizer, result.plan, loaded.kind,
                            {"target": target, "method": settings.method, "report": result.row(table.dense_ms)},
                            onnx=settings.onnx)
                step.outcome = f"measured {result.speedup:.2f}x" + ("" if result.met else ", MISSED its target")
            results.append(result)
    report = FamilyReport([r.row(table.dense_ms) for r in results], {
        "model": loaded.source.reference, "model_kind": loaded.kind, "method": settings.method,
        "table": table.metadata.get("model"), "spec": table.spec.to_dict(), "estimator": table.estimator,
        "calibration": calibration_path,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        **planning, "members_seconds": round(planning_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1), "created": now(), "machine": machine_info(),
        "versions": library_versions(),
    })
    report.save(output)
    return report
