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
from tqdm.auto import tqdm

from .adapters import model_shape
from .atomic import atomic_write_text
from .calibrate import Calibration, CalibrationLoss, load_calibration
from .database import DENSE, SEQUENTIAL, LevelDatabase, build_database, cached_database, database_key, stitch, stitch_sequential
from .environment import library_versions, machine_info, now
from .errors import UserError
from .export import save_member
from .family import FAMILY_FORMAT, report_csv
from .models import LoadedModel
from .search import spdy_search, total_time
from .surgery import PruningPlan, count_parameters
from .verify import MemberResult, Verifier, verified_member
from .table import TRUST_ADVICE, LatencyTable

log = logging.getLogger(__name__)

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

        with tqdm(total=self.settings.search_evaluations, desc=f"search {budget_ms:.1f} ms", leave=False) as bar:
            result = spdy_search(self.problem, block_budget, score, evaluations=self.settings.search_evaluations,
                                 seed=self.settings.seed, progress=lambda n, best: bar.update(n - bar.n))
        log.info("budget %.2f ms: blocks %.2f ms, score %.5f after %d evaluations", budget_ms,
                 total_time(self.problem, result.choice), result.score, result.evaluations)
        return self.db.kept_counts(self.problem, result.choice)

    def build(self, budget_ms: float):
        """(pruned model, plan, kept counts) for a model predicted to run in `budget_ms`."""
        counts = self.search(budget_ms)
        if self.settings.calibration_inputs == SEQUENTIAL:
            return (*stitch_sequential(self.loaded.model, self.db, counts, self.calibration), counts)
        return (*stitch(self.loaded.model, self.db, counts), counts)


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


def save_result(output: Path, model, loaded: LoadedModel, result: MemberResult, settings: CompressSettings,
                table: LatencyTable) -> None:
    """A member's folder: the model, with the very ONNX file that was timed; its measurement beside
    the plan, so pruning.json holds only what the same seed, table and data reproduce exactly."""
    save_member(output / result.folder, model, loaded.tokenizer, result.plan, loaded.kind,
                {"target": result.target, "method": settings.method}, onnx=settings.onnx,
                onnx_file=result.measurement.onnx_file, measurement=result.row(table.dense_ms))


def compress_model(loaded: LoadedModel, table: LatencyTable, targets: list[float], calibration_path: str,
                   output: Path, settings: CompressSettings = CompressSettings(), overwrite: bool = False) -> FamilyReport:
    started = time.perf_counter()
    shape = model_shape(loaded.model.config)
    table.check_compatible(shape, source="latency table")
    for problem in table.trust_problems():
        log.warning("latency table %s: %s: %s", table.metadata.get("model", ""), problem, TRUST_ADVICE)
    too_fast = [t for t in targets if t > table.max_speedup]
    if too_fast:
        raise UserError(f"target {max(too_fast):g}x is beyond this table's maximum speedup {table.max_speedup:.2f}x "
                        "(the fixed part and one block): choose smaller targets")
    torch.set_num_threads(table.spec.threads)
    torch.manual_seed(settings.seed)
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
        db = cached_database(settings.cache_dir, key,
                             lambda: build_database(loaded.model, calibration, table, settings.dampening))
        planning["level_database"] = {**db.metadata, "seconds_this_run": round(time.perf_counter() - started, 2)}
        planner = Planner(loaded, table, db, calibration, settings, score_loss)
    else:
        from .baselines import BaselinePlanner

        planner = BaselinePlanner(settings.method, loaded, table, calibration, settings.seed)
        planning["baseline_setup_seconds"] = round(time.perf_counter() - started, 2)
    results, planning_seconds = [], 0.0
    with tempfile.TemporaryDirectory(prefix="ziplm-verify-") as tmp:
        verifier = Verifier(loaded, table, settings.verify_rounds, Path(tmp), settings.seed)
        dense = MemberResult(1.0, "dense", PruningPlan.dense(shape), table.dense_ms, verifier.measure_dense(),
                             score_loss(loaded.model), count_parameters(loaded.model))
        save_result(output, loaded.model, loaded, dense, settings, table)
        results.append(dense)
        for target in tqdm(targets, desc="family members"):
            member_started = time.perf_counter()
            result, model = verified_member(planner, target, table, verifier, score_loss, settings.max_replans)
            planning_seconds += time.perf_counter() - member_started
            save_result(output, model, loaded, result, settings, table)
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
