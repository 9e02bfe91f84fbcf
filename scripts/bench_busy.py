"""Benchmark verification on a machine its table does not describe: does a member ever ship far past its
target, or does the run stop with one line?

The same `compress` command (the CLI, as a user runs it) three times, on a table profiled on this
machine while it was quiet:
1. quiet: nothing else runs;
2. busy: `--load` processes spin on the cores for the whole run (other work on a shared machine);
3. wrong table: every time of the table scaled by `--scale` (a table from another machine).
Each run's exit status, last line and members (target, status, measured and predicted speedup) are
printed as Markdown for docs/BENCHMARKS.md.

    python scripts/bench_busy.py --profile T.json --targets 1.5,2,3 \
        --calib ../shared/data/stsb/sts-train.csv --out runs/busy
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from ziplm_planner.environment import machine_info
from ziplm_planner.table import LatencyTable


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def compress(args: argparse.Namespace, table: Path, output: Path) -> dict:
    """One `ziplm-planner compress` run: its exit status, seconds, last line and member rows."""
    command = [sys.executable, "-m", "ziplm_planner", "compress", args.model, "--profile", str(table),
               "--targets", args.targets, "--calib", args.calib, "--method", args.method,
               "--verify-rounds", str(args.verify_rounds), "--cache-dir", str(args.out / "cache"),
               "--overwrite", "-o", str(output)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    report = output / "report.json"
    rows = json.loads(report.read_text())["members"] if done.returncode == 0 and report.is_file() else []
    return {"status": done.returncode, "seconds": time.perf_counter() - started, "last": lines[-1] if lines else "",
            "waits": [line.strip() for line in lines if "to time again" in line], "rows": rows,
            "command": " ".join(command)}


def scaled_table(path: Path, factor: float, output: Path) -> Path:
    table = LatencyTable.load(path)
    table.records = [{**r, "time_ms": r["time_ms"] * factor} for r in table.records]
    table.offset_ms, table.line_from_ms = table.offset_ms * factor, table.line_from_ms * factor
    return table.save(output)


def busy_run(args: argparse.Namespace) -> dict:
    spinners = [multiprocessing.get_context("spawn").Process(target=spin, args=(3600.0,)) for _ in range(args.load)]
    for process in spinners:
        process.start()
    try:
        return compress(args, args.profile, args.out / "busy")
    finally:
        for process in spinners:
            process.kill()


def describe(name: str, run: dict) -> str:
    lines = [f"**{name}**: exit {run['status']} after {run['seconds']:.0f} s"]
    lines += [f"- verifier: `{wait}`" for wait in run["waits"]]
    if run["rows"]:
        lines += [f"- {r['folder']}: target {r['target']:g}x, {r['status']}, measured "
                  + ("-" if r["measured_speedup"] is None else f"{r['measured_speedup']:.2f}x")
                  + f", predicted {r['predicted_speedup']:.2f}x, {r['replans']} re-plans" for r in run["rows"]]
    else:
        lines.append(f"- stopped: `{run['last']}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--profile", type=Path, required=True, help="a table profiled on this machine, quiet")
    parser.add_argument("--targets", default="1.5,2,3")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--method", default="uniform", help="uniform needs no level database: the runs are short")
    parser.add_argument("--verify-rounds", type=int, default=20)
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="spinning processes in the busy run")
    parser.add_argument("--scale", type=float, default=2.0, help="the wrong table's times over this machine's")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"quiet": compress(args, args.profile, args.out / "quiet"),
            f"busy ({args.load} spinning processes)": busy_run(args),
            f"wrong table (every time x{args.scale:g})": compress(
                args, scaled_table(args.profile, args.scale, args.out / "scaled.json"), args.out / "scaled")}
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores; `{runs['quiet']['command']}`\n")
    print("\n\n".join(describe(name, run) for name, run in runs.items()))


if __name__ == "__main__":
    main()
