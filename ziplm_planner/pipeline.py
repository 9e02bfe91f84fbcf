"""Compress a model into a family: one pruned model per speedup target, each measured to meet it.

calibration -> the method's planner (ZipLM: the level database, cached) -> the dense reference ->
each member down its road (member.py: plan, verify, recover, save) -> the family report.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .calibrate import Calibration, CalibrationLoss, load_calibration
from .cards import source_card
from .environment import library_versions, machine_info, now
from .family import FamilyReport, check_reachable
from .familydir import FamilyDir, Member
from .member import MemberRoad, Parent
from .models import LoadedModel
from .planners import planner_for
from .progress import stage
from .recovery import recovery_step
from .settings import HELD_OUT, CompressSettings, command_flags
from .table import TRUST_ADVICE, LatencyTable
from .verify import verifier_for

log = logging.getLogger(__name__)


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


def compress_model(loaded: LoadedModel, table: LatencyTable, targets: list[float], calibration_path: str,
                   output: Path, settings: CompressSettings = CompressSettings(),
                   overwrite: bool = False) -> FamilyReport | None:
    """The family for `targets`, written to `output`. With recovery under several processes
    (`accelerate launch`, `torchrun`) every process calls this; the main one prunes, measures, writes
    and returns the report, the others train with it and return None."""
    started = time.perf_counter()
    check_table(loaded, table, targets, settings)
    calibration = calibrate(loaded, table, calibration_path, settings)
    recovery = recovery_step(loaded, settings.recovery, calibration_path, table.spec.calibration_length, output,
                             settings.seed)
    if not recovery.is_main_process:  # several processes: only the main one prunes and writes
        recovery.follow()
        return None
    # the others stop if this one fails; the temporary folder holds candidate exports while they are timed
    with recovery.leading(), tempfile.TemporaryDirectory(prefix="ziplm-verify-") as tmp:
        family = FamilyDir.open(output, loaded, table, settings, calibration_path, recovery.data_path, overwrite)
        score_loss = CalibrationLoss(loaded.model, loaded.kind, score_batches(calibration, settings))
        planner = planner_for(loaded, table, calibration, settings, score_loss)
        with stage("dense reference", f"timed on {table.spec.backend}"):
            verifier = verifier_for(loaded, table, settings, Path(tmp))
            road = MemberRoad(loaded, table, calibration, settings, score_loss, planner, verifier, recovery, family)
            members = [road.dense()]
        members_started = time.perf_counter()
        members += make_members(road, targets)
        members_seconds = time.perf_counter() - members_started
    report = FamilyReport([m.result.row(table.dense_ms) for m in members], {
        **run_metadata(loaded, table, targets, calibration_path, output, settings), **planner.metadata(),
        "members_seconds": round(members_seconds, 1), **recovery.metadata(),
        "seconds": round(time.perf_counter() - started, 1), "created": now(), "machine": machine_info(),
        "versions": library_versions()})
    family.write_report(report)
    return report


def check_table(loaded: LoadedModel, table: LatencyTable, targets: list[float], settings: CompressSettings) -> None:
    """The table is for this model and reaches every target; warn where its profile was unsound."""
    table.check_compatible(loaded.shape, source="latency table")
    for problem in table.trust_problems():
        log.warning("latency table %s: %s: %s", table.name, problem, TRUST_ADVICE)
    check_reachable(targets, table)
    torch.set_num_threads(table.spec.threads)
    torch.manual_seed(settings.seed)


def calibrate(loaded: LoadedModel, table: LatencyTable, path: str, settings: CompressSettings) -> Calibration:
    """The calibration samples at the table's sequence length, and held-out ones where SPDY scores on them."""
    with stage("calibration", f"{settings.num_samples} samples of {table.spec.calibration_length} tokens, "
                              f"from {path}"):
        return load_calibration(loaded, path, table.spec.calibration_length, settings.num_samples, settings.seed,
                                settings.score_samples if settings.score_on == HELD_OUT else 0)


def make_members(road: MemberRoad, targets: list[float]) -> list[Member]:
    """Each target's member, smallest speedup first: in gradual recovery each is cut from the last."""
    dense = parent = Parent(1.0)
    members = []
    for number, target in enumerate(targets, 1):
        with stage(f"member {number} of {len(targets)}",
                   f"target {target:g}x, {road.table.layer_speedup(target):.2f}x on the layers") as step:
            member = road.make(target, parent)
            step.outcome = member.result.outcome()
        members.append(member)
        parent = road.next_parent(member, dense)
    return members


def run_metadata(loaded: LoadedModel, table: LatencyTable, targets: list[float], calibration_path: str, output: Path,
                 settings: CompressSettings) -> dict:
    """The report's record of what the family was made from and with, and the command that makes it."""
    command = ["ziplm-planner", "compress", loaded.source.reference, "--profile", str(table.path or table.name),
               "--targets", ",".join(f"{t:g}" for t in targets), "--calib", calibration_path,
               *command_flags(settings.recorded(loaded.kind)), "-o", str(output)]
    return {"model": loaded.source.reference, "command": shlex.join(command), "base_model": loaded.source.hub_id,
            "source_card": source_card(loaded.source.folder), "model_kind": loaded.kind.name,
            "method": settings.method,
            "table": table.name, "spec": table.spec.to_dict(), "estimator": table.estimator,
            "calibration": calibration_path, "settings": json.loads(json.dumps(asdict(settings), default=str))}
