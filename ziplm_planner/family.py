"""A family and its folder, light (no torch import), so that commands check what they are given before
anything heavy loads: its targets and the member folders they name, whether a folder holds a family, and
the report's format and reading it back."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .errors import UserError

FAMILY_FORMAT = "ziplm-planner/family/v1"
MEMBER_ONNX = "model.onnx"  # a member for ONNX Runtime
MEMBER_GGUF = "model.gguf"  # a decoder member for llama.cpp (timed on it, or export-gguf)


@dataclass
class FamilyReport:
    """What compress returns and writes beside the members: one row per member, and the run's metadata."""

    rows: list[dict]
    metadata: dict

    def to_dict(self) -> dict:
        return {"format": FAMILY_FORMAT, "metadata": self.metadata, "members": self.rows}

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / "report.csv", report_csv(self.rows))
        atomic_write_text(folder / "report.json", json.dumps(self.to_dict(), indent=1))


def timed_shape(spec: dict) -> str:
    """What a family's timings ran, from its report's spec: 'batch 8 x 128 tokens', or for decode
    'decode: batch 1, one token after 256 cached'."""
    if spec.get("mode") == "decode":
        return f"decode: batch {spec.get('batch_size')}, one token after {spec.get('context')} cached"
    return f"batch {spec.get('batch_size')} x {spec.get('seq_len')} tokens"


def member_name(target: float) -> str:
    """The folder of the member for `target`: dense, x1.5, x2, ..."""
    return "dense" if target == 1 else f"x{target:g}"


def parse_targets(text: str | list) -> list[float]:
    """'3,1.5,2' -> [1.5, 2.0, 3.0]; every item a finite number > 1, none empty, each its own member."""
    items = text.split(",") if isinstance(text, str) else list(text)
    if not items:
        raise UserError("no speedup targets given: give numbers > 1 separated by commas, e.g. 1.5,2,3")
    targets, names = sorted(parse_target(item, text) for item in items), set()
    for target in targets:  # one member folder per target: two that share a name would be one member
        if (name := member_name(target)) in names:
            raise UserError(f"target {target:g} is given more than once in {text!r} (one member, {name}): "
                            "give each speedup once")
        names.add(name)
    return targets


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


def check_reachable(targets: list[float], table) -> None:
    """Every target within the table's maximum speedup (the fixed part and the cheapest block)."""
    too_fast = [t for t in targets if t > table.max_speedup]
    if too_fast:
        raise UserError(f"target {max(too_fast):g}x is beyond this table's maximum speedup {table.max_speedup:.2f}x "
                        "(the fixed part and one block): choose smaller targets")


def manifest_source(output: Path) -> dict | None:
    """What the family in `output` was made from, or None where family.json is missing or unreadable
    (then the folder holds something else, as far as this run can tell)."""
    try:
        manifest = json.loads((output / "family.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("source") if isinstance(manifest, dict) else None


def check_family_dir(output: Path, overwrite: bool) -> None:
    """Before any model loads: refuse a file, or unless `overwrite` a folder holding files and no family
    (which family a folder holds, the same or another, is known once the model is: prepare_family_dir)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} is a file: give a directory for the family")
    if not overwrite and output.is_dir() and any(output.iterdir()) and manifest_source(output) is None:
        raise UserError(f"output directory {output} holds other files, not a family: use another -o "
                        "(or --overwrite to replace them)")


def read_report(folder: str | Path) -> dict:
    """report.json of a family directory, checked: a dict with metadata and member rows naming
    folders inside the family."""
    folder = Path(folder)
    path = folder / "report.json"
    if not folder.exists():
        raise UserError(f"family directory {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: give the directory `ziplm-planner compress -o` wrote")
    if not path.is_file():
        raise UserError(f"{folder} has no report.json: run `ziplm-planner compress` first")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}): run `ziplm-planner compress` again") from None
    if not isinstance(report, dict) or report.get("format") != FAMILY_FORMAT:
        raise UserError(f"{path} is not a ziplm-planner family report (expected format {FAMILY_FORMAT})")
    rows, metadata = report.get("members"), report.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(rows, list) or not rows:
        raise UserError(f"{path} has no metadata or no members: run `ziplm-planner compress` again")
    if not all(isinstance(r, dict) and isinstance(r.get("folder"), str) for r in rows):
        raise UserError(f"{path} is not a ziplm-planner family report: a member has no folder")
    if bad := [r["folder"] for r in rows if Path(r["folder"]).name != r["folder"] or r["folder"] in ("", ".", "..")]:
        raise UserError(f"{path} names a member folder {bad[0]!r} outside the family")
    return report


def report_csv(rows: list[dict]) -> str:
    """The member rows as report.csv: lists joined by spaces, scores as score_<key> columns."""
    import pandas as pd

    flat = [{**{k: v for k, v in row.items() if k != "scores"},
             **{f"score_{k}": v for k, v in (row.get("scores") or {}).items()}} for row in rows]
    frame = pd.DataFrame(flat)
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list)).any():
            frame[column] = frame[column].map(lambda v: " ".join(map(str, v)) if isinstance(v, list) else v)
    return frame.to_csv(index=False)
