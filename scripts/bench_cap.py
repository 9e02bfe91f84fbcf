"""Benchmark recovery settings (CAP's contrastive term, more distillation text) on a dev set split in two.

Every variant is the same `ziplm-planner compress` command with its own extra flags, run as a user
runs it, one after another (each is timed on a machine the others leave quiet). Each family is scored
on two halves of the dev file, split by a hash of each line, so the split is the same on every
machine: `choose` is what settings may be chosen on; `unseen` is never looked at for a choice, and
estimates quality on unseen data honestly. A variant whose family is already in --out is resumed.

    python scripts/bench_cap.py --dev ../shared/data/stsb/sts-dev.csv --out runs/cap \\
        --variant none="--loss-weights 1,1,1" --variant cap="--loss-weights 1,1,1,0.1" \\
        -- minilm --profile profiles/minilm-cpu2-onnxruntime-b8s128.json --targets 3,5,8 \\
           --calib ../shared/data/stsb/sts-train.csv --recovery gradual --train-tokens 500000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ziplm_planner.environment import machine_info, now
from ziplm_planner.evaluate import evaluate_family, retained
from ziplm_planner.family import read_report

HALVES = ("choose", "unseen")


def split_halves(path: Path, out: Path) -> dict[str, Path]:
    """The lines of `path` in two files, by the parity of each line's hash: the same split everywhere."""
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
    halves = {half: out / f"{path.stem}-{half}{path.suffix}" for half in HALVES}
    for number, half in enumerate(HALVES):
        halves[half].write_text("".join(line for line in lines
                                        if hashlib.sha256(line.encode()).digest()[0] % 2 == number))
    return halves


def run_variant(base: list[str], flags: list[str], folder: Path, log: Path) -> dict:
    """The compress command of one variant; its wall time and its peak resident memory."""
    command = [sys.executable, "-m", "ziplm_planner", "compress", *base, *flags, "-o", str(folder)]
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    with log.open("a") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak memory, not the largest child's so far
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the compress command of {folder.name} failed: see {log}")
    return {"command": shlex.join(command), "seconds": round(time.perf_counter() - started, 1),
            "peak_memory_mib": round(usage.ru_maxrss / 1024)}


def scored(folder: Path, task: str, halves: dict[str, Path], max_tokens: int | None) -> dict[str, dict[str, float]]:
    """{half: {member: score}}; `choose` is scored last, so the family's report keeps its scores."""
    return {half: evaluate_family(folder, task, halves[half], max_tokens=max_tokens) for half in reversed(HALVES)}


def training_cost(folder: Path) -> dict:
    """Tokens a second over the family's training, and its training seconds."""
    trained = [row for row in read_report(folder)["members"] if row.get("train_tokens")]
    seconds = sum(row["train_seconds"] for row in trained)
    return {"train_seconds": round(seconds, 1),
            "tokens_per_second": round(sum(row["train_tokens"] for row in trained) / max(seconds, 1e-9))}


def table(results: dict, task: str) -> str:
    """Per member, per variant: the score on each half as a share of dense, and the measured speedup."""
    rows = {variant: {row["folder"]: row for row in read_report(Path(result["folder"]))["members"]}
            for variant, result in results.items()}
    lines = ["| member | " + " | ".join(f"{v}: {' / '.join(HALVES)}" for v in results) + " |",
             "|---|" + "---|" * len(results)]
    for member in next(iter(rows.values())):
        cells = []
        for variant, result in results.items():
            row, scores = rows[variant][member], result["scores"]
            speed = "" if row.get("measured_speedup") is None else f" ({row['measured_speedup']:.2f}x {row['status']})"
            cells.append(" / ".join(f"{scores[half][member]:.2f} ({retained(scores[half][member], scores[half]['dense'], task):.1%})"
                                    for half in HALVES) + speed)
        lines.append(f"| {member} | " + " | ".join(cells) + " |")
    # tokens/s and seconds are the training's, from the reports; peak memory is this run's (a resumed family's is not
    # its training's)
    cost = ["| training tokens/s, seconds; this run's peak memory | " + " | ".join(
        f"{r['tokens_per_second']:,}, {r['train_seconds']:,.0f} s; {r['peak_memory_mib']:,} MiB" for r in results.values())
        + " |"]
    return "\n".join(lines + cost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, required=True, help="the dev file, split into choose and unseen halves")
    parser.add_argument("--task", default="stsb", help="what evaluate scores: stsb, perplexity, ...")
    parser.add_argument("--eval-tokens", type=int, default=None, help="perplexity: score the first N tokens a half")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                        help="a family: its name and the compress flags it adds to the common ones")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("base", nargs=argparse.REMAINDER, help="after --: the model and the common compress flags")
    args = parser.parse_args()
    base = args.base[1:] if args.base[:1] == ["--"] else args.base
    variants = dict(v.partition("=")[::2] for v in args.variant)
    args.out.mkdir(parents=True, exist_ok=True)
    halves = split_halves(args.dev, args.out)
    machine = machine_info()
    print(f"{now()}; {machine['cpu']}, {machine['cores']} cores; dev {args.dev} split into "
          + ", ".join(f"{half} {sum(1 for _ in path.open())} lines" for half, path in halves.items()))
    results = {}
    for name, flags in variants.items():
        folder = args.out / name
        run = run_variant(base, shlex.split(flags), folder, args.out / f"{name}.log")
        results[name] = {"folder": str(folder), "flags": flags, **run, **training_cost(folder),
                         "scores": scored(folder, args.task, halves, args.eval_tokens)}
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{args.task} on the two halves of {args.dev} (share of dense), measured speedup and verdict\n")
    print(table(results, args.task))


if __name__ == "__main__":
    main()
