"""Pictures of compressed families: score against measured speedup and latency, and what each member kept.

Reads the report.json that `ziplm-planner compress` writes (with the "scores" an evaluation adds, if any).
Draws on bare matplotlib Figures (Agg rendering, no pyplot state, no display) and writes PNG and SVG side
by side, each to a temporary name renamed when complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .atomic import atomic_write_bytes, check_writable
from .errors import UserError
from .family import read_report, timed_shape
from .progress import stage
from .settings import LOSS_TERMS

log = logging.getLogger(__name__)

REQUIRED = ("target", "folder", "met_target", "predicted_ms", "predicted_speedup", "measured_ms", "measured_speedup",
            "calibration_loss", "kept_attention", "kept_ffn")
LOWER_IS_BETTER = ("perplexity", "ppl", "loss")  # task names whose scores fall as models improve
DENSE_COLOR = "gold"  # one star for the dense reference, shared by every family
LEGEND_COLUMNS = 4  # the legend under the frontier wraps after this many entries, not past the figure
LOG_SCALE_SPAN = 10  # max / min of the scores above which the score axis is logarithmic


@dataclass(frozen=True)
class FamilyData:
    name: str  # the method ("ziplm", "magnitude", ...), or the end of its folder path where methods repeat
    rows: list[dict]  # report.json "members": MemberResult.row() plus an optional "scores" dict
    metadata: dict
    folder: Path


def read_family(folder: str | Path) -> FamilyData:
    """One family directory's report.json, checked enough to plot."""
    folder = Path(folder)
    report = folder / "report.json"
    data = read_report(folder)
    rows, metadata = data["members"], data["metadata"]
    for row in rows:
        check_row(row, report)
    if len({len(row[key]) for row in rows for key in ("kept_attention", "kept_ffn")}) != 1:
        raise UserError(f"{report}: members differ in their number of layers: rerun `ziplm-planner compress`")
    return FamilyData(family_label(metadata), rows, metadata, folder)


def family_label(metadata: dict) -> str:
    """The method, and how its members were recovered when they were: 'ziplm + gradual recovery',
    'ziplm + gradual recovery, 2 steps'."""
    method = str(metadata.get("method") or "ziplm")
    recovery = (metadata.get("settings") or {}).get("recovery") or {}
    mode, steps = recovery.get("mode", "none"), recovery.get("prune_steps", 1)
    if mode == "none":
        return method
    return f"{method} + {mode} recovery" + (f", {steps} steps" if steps != 1 else "")


def check_row(row, report: Path) -> None:
    missing = [key for key in REQUIRED if key not in row] if isinstance(row, dict) else list(REQUIRED)
    if missing:
        raise UserError(f"{report}: a member lacks {', '.join(missing)}: rerun `ziplm-planner compress`")
    numbers = all(is_number(value) for value in (row["target"], plotted_ms(row), plotted_speedup(row)))
    kept = all(isinstance(row[key], list) and all(map(is_number, row[key])) for key in ("kept_attention", "kept_ffn"))
    if not (numbers and kept and isinstance(scores(row), dict)):
        raise UserError(f"{report}: member {row['folder']} has malformed values: rerun `ziplm-planner compress`")


def verified(row: dict) -> bool:
    return row["measured_speedup"] is not None


def plotted_speedup(row: dict) -> float:
    """The measured speedup; a member shipped unverified (compress --no-verify) is drawn at its predicted one."""
    return row["measured_speedup"] if verified(row) else row["predicted_speedup"]


def plotted_ms(row: dict) -> float:
    return row["measured_ms"] if verified(row) else row["predicted_ms"]


def read_families(folders: list[str | Path]) -> list[FamilyData]:
    return distinct_names([read_family(folder) for folder in folders])


def distinct_names(families: list[FamilyData]) -> list[FamilyData]:
    """Families sharing a name are told apart by the shortest ends of their folder paths that differ:
    'run-a', or 'run-a/ziplm-gradual' for two runs that named their families alike."""
    names = [family.name for family in families]
    clashing = [index for index, name in enumerate(names) if names.count(name) > 1]
    if not clashing:
        return families
    parts = {index: families[index].folder.resolve().parts for index in clashing}
    for depth in range(1, max(map(len, parts.values())) + 1):
        ends = {index: "/".join(parts[index][-depth:]) for index in clashing}
        if len(set(ends.values())) == len(ends):
            break
    return [replace(f, name=ends[index]) if index in ends else f for index, f in enumerate(families)]


def scores(row: dict) -> dict:
    return row.get("scores") or {}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- what to put on the y axis --------------------------------------------------------------------


def choose_task(families: list[FamilyData], task: str | None = None) -> str | None:
    """The scored task to plot; None when no row has scores (the calibration loss is plotted)."""
    tasks = list(dict.fromkeys(t for family in families for row in family.rows for t in scores(row)))
    if task is not None and task not in tasks:
        raise UserError(f"no family has scores for task {task!r} (scored: {', '.join(tasks) or 'none'})")
    if task is None and len(tasks) > 1:
        log.info("scores for %s: plotting %s (choose another with task=...)", ", ".join(tasks), tasks[0])
    return task or (tasks[0] if tasks else None)


def score_label(families: list[FamilyData], task: str | None) -> str:
    if task is None:
        return "calibration loss (lower is better; no evaluation scores)"
    metas = [f.metadata.get("scores_meta") for f in families]
    meta = next((m[task] for m in metas if isinstance(m, dict) and isinstance(m.get(task), dict)), {})
    higher = meta.get("higher_is_better", not any(word in task.lower() for word in LOWER_IS_BETTER))
    return f"{meta.get('label', task)} ({'higher' if higher else 'lower'} is better)"


def scored_rows(family: FamilyData, task: str | None) -> list[tuple[dict, float]]:
    """(row, y) for the members with a finite value, by measured speedup."""
    points = []
    for row in sorted(family.rows, key=plotted_speedup):
        y = row["calibration_loss"] if task is None else scores(row).get(task)
        if is_number(y) and math.isfinite(y):
            points.append((row, float(y)))
    return points


def spec_title(families: list[FamilyData]) -> str:
    titles = []
    for meta in (family.metadata for family in families):
        spec = meta.get("spec") or {}
        shape = timed_shape(spec)
        titles.append(f"{meta.get('model', '?')}: {spec.get('backend', '?')} on {spec.get('device', 'cpu')}, {shape}")
    return "; ".join(dict.fromkeys(titles))


# --- the pictures ---------------------------------------------------------------------------------


def plot_frontier(families: list[FamilyData], output: Path, task: str | None = None) -> list[Path]:
    """Score against measured speedup (left) and latency (right, `dense_clock_latencies`), one line per family."""
    if not families:
        raise UserError("no family to plot: give at least one family directory")
    paths = output_paths(output)
    families, task = distinct_names(families), choose_task(families, task)
    fig = Figure(figsize=(12, 5.4), layout="constrained")
    by_speedup, by_latency = fig.subplots(1, 2, sharey=True)
    handles, scores = [], []
    for index, family in enumerate(families):
        points = scored_rows(family, task)
        if not points:
            log.warning("family %s has no %s values: left out of the plot", family.name, task or "calibration loss")
            continue
        color = f"C{index % 10}"
        draw_family(by_speedup, points, [plotted_speedup(row) for row, _ in points], color)
        draw_family(by_latency, points, dense_clock_latencies(family, points), color)
        handles.append(Line2D([], [], color=color, marker="o", label=family.name))
        scores += [y for _, y in points]
    if wide_positive(scores):  # perplexities of collapsed baselines: 30 and 1e10 on one axis
        by_speedup.set_yscale("log")
    draw_target_guides(by_speedup, families)
    estimator = "/".join(dict.fromkeys(str(f.metadata.get("estimator", "p10")) for f in families))
    by_speedup.set_xlabel(f"measured speedup over dense ({estimator} estimator)")
    by_latency.set_xlabel(f"latency, ms: the dense model's over each measured speedup ({estimator} estimator)")
    by_speedup.set_ylabel(score_label(families, task))
    for ax in (by_speedup, by_latency):
        ax.grid(alpha=0.3)
    handles += [Line2D([], [], ls="", marker="*", ms=13, color=DENSE_COLOR, mec="black", mew=0.6, label="dense"),
                Line2D([], [], ls="", marker="o", mfc="white", color="0.4", label="missed its target")]
    if not all(verified(row) for family in families for row in family.rows):
        handles.append(Line2D([], [], ls="", marker="s", mfc="white", color="0.4",
                              label="unverified: at its predicted speedup"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), LEGEND_COLUMNS), frameon=False)
    fig.suptitle(spec_title(families))
    return save_figure(fig, paths)


def wide_positive(values: list[float]) -> bool:
    """Positive values spanning more than an order of magnitude: on a linear axis the largest flatten the
    rest (a baseline's perplexity of 900 beside recovered members at 30-90)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPAN


def dense_clock_latencies(family: FamilyData, points: list[tuple[dict, float]]) -> list[float]:
    """Each member's latency on one clock: the family's dense model as measured, over the member's
    measured speedup. A speedup is a ratio to the dense model timed in the same rounds; a member's own
    milliseconds come from rounds minutes or hours apart, and a machine's speed drifts between them
    (a smaller member can measure slower than a larger one). Without a dense member: its own."""
    dense = next((plotted_ms(row) for row in family.rows if row["target"] == 1), None)
    return [plotted_ms(row) if dense is None else dense / plotted_speedup(row) for row, _ in points]


def draw_family(ax, points: list[tuple[dict, float]], xs: list[float], color: str) -> None:
    ax.plot(xs, [y for _, y in points], color=color, lw=1.6, alpha=0.85)
    for x, (row, y) in zip(xs, points):
        if row["target"] == 1:
            ax.plot(x, y, ls="", marker="*", ms=15, color=DENSE_COLOR, mec="black", mew=0.6, zorder=4)
        else:
            face = color if row["met_target"] else "white"
            ax.plot(x, y, ls="", marker="o" if verified(row) else "s", ms=7, color=color, mfc=face, mew=1.5, zorder=3)


def draw_target_guides(ax, families: list[FamilyData]) -> None:
    """A faint vertical line per target, labelled "1.5x" on a top axis."""
    targets = sorted({row["target"] for family in families for row in family.rows if row["target"] != 1})
    for target in targets:
        ax.axvline(target, color="0.55", lw=0.8, ls=":", zorder=0)
    low, high = ax.get_xlim()  # guides do not autoscale: keep the largest target off the frame
    ax.set_xlim(low, max([high, *(t + 0.04 * (t - low) for t in targets)]))
    top = ax.secondary_xaxis("top")
    top.set_xticks(targets, [f"{t:g}x" for t in targets])
    top.tick_params(labelsize=8, colors="0.4", length=0)


def plot_layers(family: FamilyData, output: Path) -> list[Path]:
    """Per member, the fraction of each layer's query heads and FFN neurons it kept."""
    paths = output_paths(output)
    rows = sorted(family.rows, key=lambda r: r["target"])
    dense = next((r for r in rows if r["target"] == 1), None)
    dense_att, dense_ffn = ((dense["kept_attention"], dense["kept_ffn"]) if dense else
                            (np.max([r["kept_attention"] for r in rows], 0), np.max([r["kept_ffn"] for r in rows], 0)))
    members = [r for r in rows if r["target"] != 1] or rows
    layers = np.arange(len(dense_att))
    fig = Figure(figsize=(max(7.0, 0.3 * len(layers) + 3), 1.5 * len(members) + 1.6), layout="constrained")
    axes = fig.subplots(len(members), 1, sharex=True, squeeze=False)[:, 0]
    for ax, row in zip(axes, members):
        ax.bar(layers, 1.0, 0.86, color="0.92", zorder=0)  # the dense layer, so removed blocks show as gaps
        ax.bar(layers - 0.2, np.array(row["kept_attention"]) / np.maximum(dense_att, 1), 0.4, color="C0")
        ax.bar(layers + 0.2, np.array(row["kept_ffn"]) / np.maximum(dense_ffn, 1), 0.4, color="C2")
        missed = "" if row["met_target"] else ", MISSED" if verified(row) else ", unverified"
        ax.set_title(f"{row['folder']}: {plotted_speedup(row):.2f}x {'measured' if verified(row) else 'predicted'} "
                     f"(target {row['target']:g}x{missed}), "
                     f"{row.get('parameters', 0) / 1e6:.1f}M parameters", loc="left", fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0, 0.5, 1])
    axes[-1].set_xticks(layers, [str(i) for i in layers])
    axes[-1].set_xlabel("layer")
    fig.supylabel("fraction of the dense layer kept")
    fig.legend(handles=[Patch(color="C0", label="attention (query heads)"),
                        Patch(color="C2", label="FFN neurons"), Patch(color="0.92", label="dense")],
               loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"{family.name}: kept structures per layer\n{spec_title([family])}", fontsize=11)
    return save_figure(fig, paths)


def training_curves(family: FamilyData) -> dict[str, list[dict]]:
    """Per recovered member, its loss curve from measurement.json ({"tokens", "loss", <term>, ...})."""
    curves = {}
    for row in family.rows:
        path = family.folder / row["folder"] / "measurement.json"
        try:
            curve = (json.loads(path.read_text()).get("training") or {}).get("curve") if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is corrupt: rerun `ziplm-planner compress`") from None
        if curve:
            curves[row["folder"]] = curve
    return curves


def plot_training(family: FamilyData, output: Path) -> list[Path]:
    """The recovery loss curves of a family: every loss term against tokens seen, one line per member.
    Nothing is written for a family that was not recovered."""
    curves = training_curves(family)
    if not curves:
        return []
    terms = [t for t in ("loss", *LOSS_TERMS) if any(t in point for c in curves.values() for point in c)]
    fig = Figure(figsize=(3.6 * len(terms) + 1, 3.8), layout="constrained")
    for ax, term in zip(fig.subplots(1, len(terms), squeeze=False)[0], terms):
        for color, (member, curve) in enumerate(curves.items()):
            points = [(p["tokens"], p[term]) for p in curve if term in p]
            ax.plot(*zip(*points), color=f"C{color}", label=member)
        ax.set_title("total loss" if term == "loss" else term, fontsize=10)
        ax.set_xlabel("tokens seen")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center", frameon=False)
    fig.suptitle(f"{family.name}: distillation loss per member\n{spec_title([family])}", fontsize=11)
    return save_figure(fig, output_paths(output))


def slug(name: str) -> str:
    """A family name as part of a file name: 'ziplm + gradual recovery' -> 'ziplm-gradual-recovery'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


# --- writing --------------------------------------------------------------------------------------


def output_paths(output: Path) -> list[Path]:
    """`output` and its twin in the other format (x.png -> x.png, x.svg), both checked writable."""
    output = Path(output)
    twin = {".png": ".svg", ".svg": ".png"}.get(output.suffix.lower())
    if twin is None:
        raise UserError(f"plot output {output} must end with .png or .svg (the other format is written beside it)")
    return [check_writable(output), check_writable(output.with_suffix(twin))]


def save_figure(fig: Figure, paths: list[Path]) -> list[Path]:
    """Render every format first, then write each to a temporary name and rename it."""
    rendered = []
    # SVG text stays text: searchable, editable
    with stage("plot", ", ".join(map(str, paths))), matplotlib.rc_context({"svg.fonttype": "none"}):
        for path in paths:
            buffer = io.BytesIO()
            fmt = path.suffix[1:].lower()
            fig.savefig(buffer, format=fmt, dpi=150, metadata={"Date": None} if fmt == "svg" else None)
            rendered.append(buffer.getvalue())
    for path, data in zip(paths, rendered):
        atomic_write_bytes(path, data)
        log.info("wrote %s", path)
    return paths
