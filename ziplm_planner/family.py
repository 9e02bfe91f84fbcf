"""The family directory's report: its format, and reading it back (light: no torch import)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .errors import UserError

FAMILY_FORMAT = "ziplm-planner/family/v1"


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
