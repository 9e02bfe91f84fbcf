"""The family directory a compress run writes: its manifest (what the family is made from: the model
by content, the data by digest, the table and the settings), the members an earlier run of the same
family saved (a rerun resumes from them), each member's folder, and the report."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .backends import backend_for
from .database import data_identity, file_digest
from .errors import UserError
from .export import MEASUREMENT, ONNX, WEIGHTS, load_pruned, read_record, save_member
from .cards import write_cards
from .family import FAMILY_FORMAT, FamilyReport, check_family_dir, manifest_source, member_name
from .models import LoadedModel
from .settings import CompressSettings, file_list
from .spec import InferenceSpec
from .surgery import PruningPlan
from .table import LatencyTable
from .verify import Measurement, MemberResult

log = logging.getLogger(__name__)


@dataclass
class Member:
    """A member on its way into the family folder: what is known of it, and the model itself."""

    result: MemberResult
    model: object  # the pruned model; None for one an earlier run saved, where nothing is cut from it
    cut_from: PruningPlan | None = None  # gradual: the plan of the member it was cut from
    steps: tuple[dict, ...] = ()  # gradual with several prune steps: the intermediate steps, trained


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


def recorded_settings(settings: CompressSettings) -> dict:
    """The settings as family.json records them: JSON, without the cache folder (it changes no member)."""
    return json.loads(json.dumps({k: v for k, v in asdict(settings).items() if k != "cache_dir"}, default=str))


def training_identity(training_data: str | None) -> dict | list | None:
    """--train-data by content: one file's identity, or a list of them for several."""
    if training_data is None:
        return None
    files = file_list(training_data)
    return data_identity(files[0]) if len(files) == 1 else [data_identity(path) for path in files]


def family_manifest(loaded: LoadedModel, table: LatencyTable, settings: CompressSettings, calibration: str,
                    training_data: str | None) -> dict:
    """What a member depends on: a rerun with all of it the same continues the family and reuses members."""
    return {"format": FAMILY_FORMAT, "source": {
        "model": model_fingerprint(loaded)["location"], "method": settings.method, "table": table.spec.to_dict(),
        "table_created": table.metadata.get("created"), "shape": asdict(table.shape),
        "calibration": data_identity(calibration),
        "training_data": training_identity(training_data),
        "settings": recorded_settings(settings)}}


def manifest_defaults(table: LatencyTable) -> dict:
    """The source fields a version may add, at their defaults, laid out as in family_manifest."""
    return {"table": InferenceSpec(backend=table.spec.backend).to_dict(),
            "settings": recorded_settings(CompressSettings())}


def same_source(recorded, current, defaults) -> bool:
    """Whether a family folder's recorded source is this run's: equal, where a field that a later version
    added (absent from the record) counts as equal at its default, so a run interrupted before an upgrade
    goes on after it. A field the record has and this run does not is a difference."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded == current
    defaults = defaults if isinstance(defaults, dict) else {}
    def same(key, value) -> bool:
        if key in recorded:
            return same_source(recorded[key], value, defaults.get(key))
        return value == defaults.get(key, object())  # no default known: a difference
    return recorded.keys() <= current.keys() and all(same(key, value) for key, value in current.items())


def prepare_family_dir(output: Path, manifest: dict, overwrite: bool, defaults: dict | None = None) -> bool:
    """Refuse a directory holding something else unless `overwrite`; record what this run makes.
    True where the directory already holds this family (an earlier, perhaps interrupted, run; `defaults`:
    manifest_defaults)."""
    check_family_dir(output, overwrite)
    same = False
    if output.exists() and any(output.iterdir()):
        same = same_source(manifest_source(output), manifest["source"], defaults)
        if not same and not overwrite:
            raise UserError(f"output directory {output} already holds a different family or other files: "
                            "use --overwrite or another -o")
        if overwrite and not same:
            shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "family.json", json.dumps(manifest, indent=1))
    return same


def held_folder(output: Path, name: str) -> Path:
    """Where a verified member waits, as pruned, until it is trained and saved: a rerun after an
    interruption trains this very model. Verifying again could re-plan another one on a machine whose
    speed drifted meanwhile, and the training done so far would be lost."""
    return output / f".verified-{name}"


def plan_identity(plan: PruningPlan | None) -> dict | None:
    """A plan as JSON gives it back, to compare with one read from a file."""
    return None if plan is None else json.loads(json.dumps(plan.to_dict()))


def measurement_record(result: MemberResult, dense_ms: float) -> dict:
    """measurement.json: the member's report row, the timings it came from, and its training."""
    timing = None if result.measurement is None else result.measurement.to_dict()
    return {**result.row(dense_ms), "timing": timing, "training": result.recovery}


def saved_result(folder: Path, target: float, table: LatencyTable, onnx: bool,
                 calibration_loss: float | None = None, shipped: bool = True) -> MemberResult | None:
    """A member saved in `folder` (by an earlier run of this family: the manifest says with the same
    settings, data and table), rebuilt from its files; None, and the member is made again, unless every
    file is there, it was made for `target` on this table's prediction, and (where given) with this
    calibration loss."""
    try:
        record, saved = read_record(folder), json.loads((folder / MEASUREMENT).read_text())
        plan = PruningPlan.from_dict(record["plan"])
        timing = saved["timing"]
        measurement = None if timing is None else Measurement.from_dict(timing, backend_for(table.spec).timed)
        result = MemberResult(target, member_name(target), plan, table.predict(plan.kept_counts()), measurement,
                              saved["calibration_loss"], saved["parameters"], saved["replans"], saved["speedups_tried"],
                              saved.get("predicted_speedups_tried", []), saved["training"])
    except (UserError, OSError, ValueError, KeyError, TypeError):  # missing, unreadable, or from an older version
        return None
    # a shipped member holds the very file that was timed; a held one (not `shipped`) is timed again once trained
    timed = [backend_for(table.spec).member_file] if shipped and measurement is not None else []
    files = ["config.json", WEIGHTS, *([ONNX] if onnx else []), *timed]
    complete = all((folder / name).is_file() for name in files) and (record.get("onnx") is not None or not onnx)
    same = (saved.get("target") == target and saved.get("predicted_ms") == round(result.predicted_ms, 4)
            and (calibration_loss is None or saved["calibration_loss"] == calibration_loss))
    return result if complete and same else None


@dataclass
class FamilyDir:
    """The family folder of one run: members are saved into it, and reused from it when the run
    continues an earlier one of the same family (`resumed`)."""

    path: Path
    loaded: LoadedModel
    table: LatencyTable
    settings: CompressSettings
    resumed: bool

    @classmethod
    def open(cls, output: Path, loaded: LoadedModel, table: LatencyTable, settings: CompressSettings,
             calibration: str, training_data: str | None, overwrite: bool) -> FamilyDir:
        manifest = family_manifest(loaded, table, settings, calibration, training_data)
        return cls(output, loaded, table, settings,
                   prepare_family_dir(output, manifest, overwrite, manifest_defaults(table)))

    def finished(self, target: float, calibration_loss: float | None = None, load: bool = False) -> Member | None:
        """The member for `target` an earlier run of this family saved, if any (never made twice); its
        model is loaded where `load` asks for it (gradual: the next member is cut from it)."""
        folder = self.path / member_name(target)
        if not self.resumed or (result := saved_result(folder, target, self.table, self.settings.onnx,
                                                       calibration_loss)) is None:
            return None
        log.info("reusing %s from an earlier run of this family", folder)
        return Member(result, load_pruned(folder) if load else None)

    def save(self, member: Member) -> None:
        """A member's folder: the model, with the very ONNX file that was timed; its measurement beside
        the plan, so pruning.json holds only what the same seed, table and data reproduce exactly."""
        result = member.result
        save_member(self.path / result.folder, member.model, self.loaded.tokenizer, result.plan, self.loaded.kind,
                    {"target": result.target, "method": self.settings.method}, onnx=self.settings.onnx,
                    timed_file=result.timed_file,
                    measurement=measurement_record(result, self.table.dense_ms), source=self.loaded.source.folder)

    def hold(self, member: Member) -> None:
        """Keep a verified member, as pruned, until its training is done (`held_folder`): with the plan it
        was cut from and the intermediate steps it was reached through."""
        result = member.result
        save_member(held_folder(self.path, result.folder), member.model, None, result.plan, self.loaded.kind,
                    {"target": result.target, "method": self.settings.method, "cut_from": plan_identity(member.cut_from),
                     "intermediate_steps": list(member.steps)}, onnx=False,
                    measurement=measurement_record(result, self.table.dense_ms))

    def held(self, target: float, cut_from: PruningPlan | None) -> Member | None:
        """The member for `target` an earlier run of this family verified and began to train, if it was cut
        from `cut_from`; else None, and it is planned again."""
        folder = held_folder(self.path, member_name(target))
        if not self.resumed or (result := saved_result(folder, target, self.table, onnx=False, shipped=False)) is None:
            return None
        record = read_record(folder)
        if record.get("cut_from") != plan_identity(cut_from):  # the member before it was made again, differently
            return None
        log.info("training %s as an earlier run of this family verified it", result.folder)
        return Member(result, load_pruned(folder), cut_from, tuple(record["intermediate_steps"]))

    def write_report(self, report: FamilyReport) -> None:
        report.save(self.path)
        write_cards(self.path)
