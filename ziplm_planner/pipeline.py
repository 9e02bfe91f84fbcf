"""One-shot ZipLM: a family of pruned models, one per speedup target, each measured to meet it.

calibrate -> level database (cached) -> per target: SPDY search over the DP -> stitch + surgery
-> measure against the dense model on the table's backend -> re-plan tighter if it misses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapters import ModelShape, model_shape
from .atomic import atomic_write_text
from .calibrate import Calibration, CalibrationLoss, load_calibration
from .database import LevelDatabase, build_database, cached_database, data_identity, database_key, file_digest
from .stitch import stitch, stitch_sequential
from .environment import library_versions, machine_info, now
from .errors import UserError
from .export import MEASUREMENT, ONNX, WEIGHTS, load_pruned, read_record, save_member
from .family import FAMILY_FORMAT, report_csv
from .models import LoadedModel
from .progress import bar, stage
from .search import spdy_search, total_time
from .surgery import PruningPlan, count_parameters
from .recovery import Recovery, held_folder
from .settings import CORRECTED, FISHER, GRADUAL, HELD_OUT, NONE, SEQUENTIAL, ZIPLM, CompressSettings
from .verify import Measurement, MemberResult, Verifier, member_name, verified_member
from .table import TRUST_ADVICE, LatencyTable

log = logging.getLogger(__name__)



def parse_targets(text: str | list) -> list[float]:
    """'1.5,2,3' -> [1.5, 2.0, 3.0]; every item a finite number > 1, none empty."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if not items:
        raise UserError("no speedup targets given: give numbers > 1 separated by commas, e.g. 1.5,2,3")
    return sorted({parse_target(item, text) for item in items})


def parse_target(item, text) -> float:
    """One speedup target; `text` is the whole list, quoted in the message."""
    if not str(item).strip():
        raise UserError(f"targets must be numbers separated by commas, got an empty item in {text!r}")
    try:
        target = float(item)
    except (TypeError, ValueError):
        raise UserError(f"targets must be numbers separated by commas, got {item!r} in {text!r}") from None
    # NaN compares false with everything, so it would pass a plain `> 1` test
    if not math.isfinite(target) or target <= 1:
        raise UserError(f"every speedup target must be a finite number > 1, got {item!r} in {text!r}")
    return target


def check_reachable(targets: list[float], table: LatencyTable) -> None:
    """Every target within the table's maximum speedup (the fixed part and the cheapest block)."""
    too_fast = [t for t in targets if t > table.max_speedup]
    if too_fast:
        raise UserError(f"target {max(too_fast):g}x is beyond this table's maximum speedup {table.max_speedup:.2f}x "
                        "(the fixed part and one block): choose smaller targets")


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


def manifest_source(output: Path) -> dict | None:
    """What the family in `output` was made from, or None where family.json is missing or unreadable
    (then the folder holds something else, as far as this run can tell)."""
    try:
        manifest = json.loads((output / "family.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("source") if isinstance(manifest, dict) else None


def prepare_family_dir(output: Path, manifest: dict, overwrite: bool) -> bool:
    """Refuse a directory holding something else unless `overwrite`; record what this run makes.
    True where the directory already holds this family (an earlier, perhaps interrupted, run)."""
    manifest_path = output / "family.json"
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file: give a directory for the family")
    same = False
    if output.exists() and any(output.iterdir()):
        same = manifest_source(output) == manifest["source"]
        if not same and not overwrite:
            raise UserError(f"output directory {output} already holds a different family or other files: "
                            "use --overwrite or another -o")
        if overwrite and not same:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return same


# --- planning one member ---------------------------------------------------------------------------


class ZipLMPlanner:
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
        correction = self.calibration if self.settings.calibration_inputs == CORRECTED else None
        return (*stitch(self.loaded.model, self.db, counts, correction), counts)


def fisher_kind(loaded: LoadedModel, settings: CompressSettings) -> str | None:
    """The model kind the level database computes block Fisher for; None for relative errors."""
    return loaded.kind if settings.block_errors == FISHER else None


def gradual_planner(loaded: LoadedModel, current, plan: PruningPlan, table: LatencyTable, calibration: Calibration,
                    settings: CompressSettings, score_loss: CalibrationLoss):
    """The method's planner on the model pruned and distilled so far, so the next member is cut from this
    one (members are nested): for ZipLM, Hessians, OBS and the level database recomputed on it; for a
    baseline, its importances (with magnitude, this is GMP*)."""
    loaded = dataclasses.replace(loaded, model=current)
    if settings.method != ZIPLM:
        from .baselines import baseline_planner

        with stage(f"{settings.method} baseline", f"on the current model ({count_parameters(current):,} parameters)"):
            return baseline_planner(settings.method, loaded, table, calibration, settings.seed, base=plan)
    with stage("level database", f"of the current model ({count_parameters(current):,} parameters)"):
        db = build_database(current, calibration, table, settings.dampening, base=plan, kind=fisher_kind(loaded, settings))
    return ZipLMPlanner(loaded, table, db, calibration, settings, score_loss)


# --- the dense reference -------------------------------------------------------------------------------


def dense_result(loaded: LoadedModel, shape: ModelShape, table: LatencyTable, measurement: Measurement,
                 calibration_loss: float) -> MemberResult:
    return MemberResult(1.0, member_name(1.0), PruningPlan.dense(shape), table.dense_ms, measurement,
                        calibration_loss, count_parameters(loaded.model))


def measurement_record(result: MemberResult, table: LatencyTable) -> dict:
    """measurement.json: the member's report row, the timings it came from, and its training."""
    return {**result.row(table.dense_ms), "timing": result.measurement.to_dict(), "training": result.recovery}


def saved_result(folder: Path, target: float, table: LatencyTable, onnx: bool,
                 calibration_loss: float | None = None) -> MemberResult | None:
    """A member an earlier run of this family saved (the manifest says with the same settings, data and
    table), rebuilt from its files; None, and the member is made again, unless every file is there, it
    was made for `target` on this table's prediction, and (where given) with this calibration loss."""
    try:
        record, saved = read_record(folder), json.loads((folder / MEASUREMENT).read_text())
        plan = PruningPlan.from_dict(record["plan"])
        result = MemberResult(target, member_name(target), plan, table.predict(plan.kept_counts()),
                              Measurement.from_dict(saved["timing"]), saved["calibration_loss"], saved["parameters"],
                              saved["replans"], saved["speedups_tried"], saved.get("predicted_speedups_tried", []),
                              saved["training"])
    except (UserError, OSError, ValueError, KeyError, TypeError):  # missing, unreadable, or from an older version
        return None
    files = ["config.json", WEIGHTS, *([ONNX] if onnx else [])]
    complete = all((folder / name).is_file() for name in files) and (record.get("onnx") is not None or not onnx)
    same = (saved.get("target") == target and saved.get("predicted_ms") == round(result.predicted_ms, 4)
            and (calibration_loss is None or saved["calibration_loss"] == calibration_loss))
    return result if complete and same else None


def dense_member(loaded: LoadedModel, shape: ModelShape, table: LatencyTable, verifier: Verifier,
                 calibration_loss: float, output: Path, settings: CompressSettings, resumed: bool) -> MemberResult:
    """The dense member: reused from a complete dense/ when this run continues the family, else timed
    with the verifier's protocol and saved."""
    if resumed and (result := saved_result(output / "dense", 1.0, table, settings.onnx, calibration_loss)):
        log.info("reusing %s from an earlier run of this family", output / "dense")
        return result
    result = dense_result(loaded, shape, table, verifier.measure_dense(), calibration_loss)
    save_result(output, loaded.model, loaded, result, settings, table)
    return result


def plan_identity(plan: PruningPlan | None) -> dict | None:
    """A plan as JSON gives it back, to compare with one read from a file."""
    return None if plan is None else json.loads(json.dumps(plan.to_dict()))


# --- the whole run -------------------------------------------------------------------------------------


def score_batches(calibration: Calibration, settings: CompressSettings) -> list[dict]:
    """What SPDY scores candidates (and the report scores members) on: held-out samples where asked
    for and the data has them, else the first of the Hessians' own."""
    held_out = settings.score_on == HELD_OUT
    available = 0 if calibration.held_out is None else len(calibration.held_out.input_ids)
    if held_out and available < settings.score_samples:
        log.warning("calibration data %s has %d samples beyond the %d the Hessians use, fewer than the %d to score "
                    "on: %s", calibration.source, available, calibration.num_samples, settings.score_samples,
                    f"scoring on {available}" if available else "scoring on the Hessians' own samples")
    return calibration.batches(settings.score_samples, held_out=held_out)


def intermediate_speedups(start: float, target: float, steps: int) -> list[float]:
    """Where a gradual run prunes to on its way from the speedup `start` to `target` in `steps` steps, the
    target itself excluded: evenly spaced in log speedup, so every step takes a like share of the runtime."""
    return [start * (target / start) ** (step / steps) for step in range(1, steps)]


def model_fingerprint(loaded: LoadedModel) -> dict:
    """The model a family and its level database are made from: where it is, its config, and each weight
    file by content."""
    location = Path(loaded.source.location)
    files = {}
    if location.is_dir():
        files = {f.name: file_digest(f) for f in sorted(location.iterdir())
                 if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")}
    return {"location": str(location), "gguf": loaded.source.gguf_file, "files": files,
            "config": json.loads(loaded.model.config.to_json_string(use_diff=False))}


def save_result(output: Path, model, loaded: LoadedModel, result: MemberResult, settings: CompressSettings,
                table: LatencyTable) -> None:
    """A member's folder: the model, with the very ONNX file that was timed; its measurement beside
    the plan, so pruning.json holds only what the same seed, table and data reproduce exactly."""
    save_member(output / result.folder, model, loaded.tokenizer, result.plan, loaded.kind,
                {"target": result.target, "method": settings.method}, onnx=settings.onnx,
                onnx_file=result.measurement.onnx_file, measurement=measurement_record(result, table))


@dataclass
class MemberMaker:
    """Makes one member of a family: reused where an earlier run of it saved the member, else cut from the
    planner's model and verified (or, resuming, taken as an earlier run verified it), trained where
    recovery asks for it, and saved."""

    loaded: LoadedModel
    table: LatencyTable
    calibration: Calibration
    settings: CompressSettings
    score_loss: CalibrationLoss
    verifier: Verifier
    recovery: Recovery | None
    output: Path
    resumed: bool

    def make(self, target: float, planner, previous: tuple | None, reached: float):
        """(result, model) of the member for `target`. `previous` (gradual: the last member's model and
        plan, reached at speedup `reached`) is what it is cut from; else `planner`'s model, the dense one."""
        folder = self.output / member_name(target)
        if self.resumed and (result := saved_result(folder, target, self.table, self.settings.onnx)):
            log.info("reusing %s from an earlier run of this family", folder)  # never made twice
            gradual = self.settings.recovery.mode == GRADUAL
            return result, load_pruned(folder) if gradual else None  # gradual: the next is cut from it
        cut_from = previous[1] if previous is not None else None
        if self.resumed and self.recovery is not None and (held := self.held(target, cut_from)):
            log.info("training %s as an earlier run of this family verified it", folder.name)
            result, model, steps = held
        else:
            if previous is not None:  # gradual: on from the last member, recovered
                planner = gradual_planner(self.loaded, *previous, self.table, self.calibration, self.settings,
                                          self.score_loss)
            result, model, steps = self.cut(planner, target, reached, folder.name)
            if self.recovery is not None:
                self.hold(model, result, cut_from, steps)
        if self.recovery is not None:
            result = self.recovery.recover(result, model, self.verifier, self.score_loss, steps)
        save_result(self.output, model, self.loaded, result, self.settings, self.table)
        if self.recovery is not None:
            self.recovery.finished(result)
        return result, model

    def cut(self, planner, target: float, reached: float, name: str):
        """(result, model, intermediate steps): `planner`'s model pruned from `reached` toward `target`
        through the intermediate speedups (gradual with several prune steps: each step distilled and a
        new planner made on it), then the member verified and re-planned while it measures outside the band."""
        table, steps = self.table, []
        for speedup in intermediate_speedups(reached, target, self.settings.recovery.prune_steps):
            step_model, plan, counts = planner.build(table.dense_ms / speedup)
            steps.append(self.recovery.intermediate(step_model, plan, f"{name}-step{len(steps) + 1}", speedup,
                                                    table.dense_ms / table.predict(counts)))
            planner = gradual_planner(self.loaded, step_model, plan, table, self.calibration, self.settings,
                                      self.score_loss)
        result, model = verified_member(planner, target, table, self.verifier, self.score_loss,
                                        self.settings.max_replans)
        return result, model, steps

    def hold(self, model, result: MemberResult, cut_from: PruningPlan | None, steps: list[dict]) -> None:
        """Keep a verified member, as pruned, until its training is done (recovery.held_folder): with the
        plan it was cut from and the intermediate steps it was reached through."""
        save_member(held_folder(self.output, result.folder), model, None, result.plan, self.loaded.kind,
                    {"target": result.target, "method": self.settings.method, "cut_from": plan_identity(cut_from),
                     "intermediate_steps": steps}, onnx=False, measurement=measurement_record(result, self.table))

    def held(self, target: float, cut_from: PruningPlan | None):
        """(result, model, intermediate steps) of the member for `target` an earlier run of this family
        verified and began to train, if it was cut from `cut_from`; else None, and it is planned again."""
        folder = held_folder(self.output, member_name(target))
        if (result := saved_result(folder, target, self.table, onnx=False)) is None:
            return None
        record = read_record(folder)
        if record.get("cut_from") != plan_identity(cut_from):  # the member before it was made again, differently
            return None
        return result, load_pruned(folder), record["intermediate_steps"]


def compress_model(loaded: LoadedModel, table: LatencyTable, targets: list[float], calibration_path: str,
                   output: Path, settings: CompressSettings = CompressSettings(),
                   overwrite: bool = False) -> FamilyReport | None:
    """The family for `targets`, written to `output`. With recovery under several processes
    (`accelerate launch`, `torchrun`) every process calls this; the main one prunes, measures, writes
    and returns the report, the others train with it and return None."""
    started = time.perf_counter()
    shape = model_shape(loaded.model.config)
    table.check_compatible(shape, source="latency table")
    for problem in table.trust_problems():
        log.warning("latency table %s: %s: %s", table.metadata.get("model", ""), problem, TRUST_ADVICE)
    check_reachable(targets, table)
    torch.set_num_threads(table.spec.threads)
    torch.manual_seed(settings.seed)
    with stage("calibration", f"{settings.num_samples} samples of {table.spec.calibration_length} tokens, "
                              f"from {calibration_path}"):
        calibration = load_calibration(loaded, calibration_path, table.spec.calibration_length, settings.num_samples,
                                       settings.seed, settings.score_samples if settings.score_on == HELD_OUT else 0)
    recovery = None  # its training data is read now: a bad file fails before any pruning
    if settings.recovery.mode != NONE:
        recovery = Recovery(loaded, settings.recovery, calibration_path, table.spec.calibration_length, output,
                            settings.seed)
        if not recovery.accelerator.is_main_process:  # several processes: only the main one prunes and writes
            recovery.follow()
            return None
    # the others stop if this one fails; the temporary folder holds candidate exports while they are timed
    with (recovery.leading() if recovery is not None else nullcontext(),
          tempfile.TemporaryDirectory(prefix="ziplm-verify-") as tmp):
        fingerprint = model_fingerprint(loaded)
        # what a member depends on: a rerun with all of it the same continues the family and reuses members
        manifest = {"format": FAMILY_FORMAT, "source": {
            "model": fingerprint["location"], "method": settings.method, "table": table.spec.to_dict(),
            "table_created": table.metadata.get("created"), "shape": asdict(shape),
            "calibration": data_identity(calibration_path),
            "training_data": data_identity(recovery.data_path) if recovery is not None else None,
            "settings": json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "cache_dir"},
                                              default=str))}}
        resumed = prepare_family_dir(output, manifest, overwrite)

        score_loss = CalibrationLoss(loaded.model, loaded.kind, score_batches(calibration, settings))
        planning = {}
        if settings.method == ZIPLM:
            key = database_key(fingerprint, calibration, table, settings.dampening, settings.num_samples,
                               settings.seed, settings.block_errors)
            with stage("level database", f"{shape.num_layers} layers, {calibration.num_samples} samples") as step:
                db = cached_database(settings.cache_dir, key,
                                     lambda: build_database(loaded.model, calibration, table, settings.dampening,
                                                            kind=fisher_kind(loaded, settings)))
                step.outcome = "from the cache" if db.metadata.get("cached") else f"cached in {settings.cache_dir}"
            planning["level_database"] = {**db.metadata, "seconds_this_run": round(time.perf_counter() - started, 2)}
            planner = ZipLMPlanner(loaded, table, db, calibration, settings, score_loss)
        else:
            from .baselines import baseline_planner

            with stage(f"{settings.method} baseline"):
                planner = baseline_planner(settings.method, loaded, table, calibration, settings.seed)
            planning["baseline_setup_seconds"] = round(time.perf_counter() - started, 2)
        results, planning_seconds = [], 0.0
        with stage("dense reference", f"timed on {table.spec.backend}"):
            verifier = Verifier(loaded, table, settings.verify_rounds, Path(tmp), settings.seed)
            results.append(dense_member(loaded, shape, table, verifier, score_loss(loaded.model), output, settings,
                                        resumed))
        members = MemberMaker(loaded, table, calibration, settings, score_loss, verifier, recovery, output, resumed)
        previous, reached = None, 1.0  # gradual: the last member, its plan and its target
        for number, target in enumerate(targets, 1):
            with stage(f"member {number} of {len(targets)}",
                       f"target {target:g}x, {table.layer_speedup(target):.2f}x on the layers") as step:
                member_started = time.perf_counter()
                result, model = members.make(target, planner, previous, reached)
                planning_seconds += time.perf_counter() - member_started
                if settings.recovery.mode == GRADUAL:
                    previous, reached = (model, result.plan), target
                step.outcome = f"measured {result.speedup:.2f}x, {result.status}"
            results.append(result)
    report = FamilyReport([r.row(table.dense_ms) for r in results], {
        "model": loaded.source.reference, "model_kind": loaded.kind, "method": settings.method,
        "table": table.metadata.get("model"), "spec": table.spec.to_dict(), "estimator": table.estimator,
        "calibration": calibration_path,
        "settings": json.loads(json.dumps(asdict(settings), default=str)),
        **planning, "members_seconds": round(planning_seconds, 1),
        **(recovery.metadata() if recovery is not None else {}),
        "seconds": round(time.perf_counter() - started, 1), "created": now(), "machine": machine_info(),
        "versions": library_versions(),
    })
    report.save(output)
    return report
