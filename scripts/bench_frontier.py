"""Benchmark the frontier: ziplm against every baseline, planned on the same table and budgets.

Each method makes a family with `compress --method`, every member is evaluated on the task,
and one plot shows all of them. Prints Markdown for docs/BENCHMARKS.md.

    python scripts/bench_frontier.py --profile profiles/minilm-cpu2-onnxruntime-b8s128.json \
        --targets 1.5,2,3,5 --calib ../shared/data/stsb/sts-train.csv \
        --task stsb --eval ../shared/data/stsb/sts-dev.csv --out runs/frontier-minilm
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import add_compress_arguments, compress_settings, scratch_dir
from ziplm_planner.evaluate import evaluate_family
from ziplm_planner.family import parse_targets
from ziplm_planner.settings import METHODS
from ziplm_planner.plot import plot_frontier, read_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compress_arguments(parser, targets="1.5,2,3,5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--eval", required=True)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    targets = parse_targets(args.targets)
    cache = scratch_dir("bench-cache-")
    scores, costs, speedups = {}, {}, {}
    for method in args.methods.split(","):
        family = args.out / method
        started = time.perf_counter()
        report = zp.compress(loaded, args.profile, targets, args.calib, family,
                             settings=compress_settings(args, cache, method=method), overwrite=True)
        costs[method] = (time.perf_counter() - started, report.metadata["members_seconds"])
        scores[method] = evaluate_family(family, args.task, args.eval, max_tokens=args.max_tokens)
        speedups[method] = {r["folder"]: (r["measured_speedup"], r["met_target"]) for r in report.rows}
    families = [read_family(args.out / method) for method in scores]
    plots = plot_frontier(families, args.out / "frontier.png", task=args.task)
    higher = json.loads((args.out / next(iter(scores)) / "report.json").read_text())["metadata"]["scores_meta"][args.task][
        "higher_is_better"]

    members = [f"x{t:g}" for t in targets]
    print(f"model {args.model}, table {args.profile}, task {args.task} on {args.eval}; "
          f"{'higher' if higher else 'lower'} is better; cell: score (measured speedup)")
    print("| method | dense | " + " | ".join(members) + " |")
    print("|---|---|" + "---|" * len(members))
    for method, values in scores.items():
        cells = [f"{values[m]:.2f} ({speedups[method][m][0]:.2f}x{'' if speedups[method][m][1] else ', missed'})"
                 for m in members]
        print(f"| {method} | {values['dense']:.2f} | " + " | ".join(cells) + " |")
    if "ziplm" in scores and len(scores) > 1:
        sign = 1 if higher else -1
        margins = [sign * (scores["ziplm"][m] - (max if higher else min)(v[m] for k, v in scores.items() if k != "ziplm"))
                   for m in members]
        print("| ziplm − best baseline | | " + " | ".join(f"{d:+.2f}" for d in margins) + " |")
    print("\n| method | whole compress (s) | planning members (s) |")
    print("|---|---|---|")
    for method, (total, members_seconds) in costs.items():
        print(f"| {method} | {total:.1f} | {members_seconds:.1f} |")
    print("plots: " + ", ".join(map(str, plots)))


if __name__ == "__main__":
    main()
