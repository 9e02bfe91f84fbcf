"""Benchmark the profiler on the bundled model: time to profile, additivity error, timing spread.

Writes the tables to profiles/ (the shipped reference tables) and prints a Markdown summary
for docs/BENCHMARKS.md.

    python scripts/bench_profile.py [--model minilm] [--backends torch,onnxruntime] [--out profiles]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import add_profile_arguments, profile_spec
from ziplm_planner.environment import machine_info
from ziplm_planner.settings import ProfileSettings
from ziplm_planner.spec import BACKENDS, InferenceSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    defaults = InferenceSpec()
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--mode", default=defaults.mode)
    parser.add_argument("--context", type=int, default=defaults.context)
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--tag", default=f"cpu{os.cpu_count()}")
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; model {args.model}")
    print("| backend | profile time (s) | dense predicted (ms) | max speedup | additivity median / max | "
          "block spread p90/p10 median (max) |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        shape = f"b{args.batch_size}" + (f"d{args.context}" if args.mode == "decode" else f"s{args.seq_len}")
        path = args.out / f"{args.model}-{args.tag}-{backend}-{shape}.json"
        started = time.perf_counter()
        table = zp.profile(loaded, path, spec=profile_spec(args, backend=backend, mode=args.mode, context=args.context),
                           settings=ProfileSettings(rounds=args.rounds))
        seconds = time.perf_counter() - started
        spreads = table.to_frame()["spread"]
        median_err, max_err = table.additivity_errors()
        print(f"| {backend} | {seconds:.0f} | {table.dense_ms:.1f} | {table.max_speedup:.2f}x | "
              f"{median_err:.1%} / {max_err:.1%} | {statistics.median(spreads):.2f} ({max(spreads):.2f}) |")
        for row in table.additivity:
            print(f"    additivity: predicted {row['predicted_ms']:.1f} ms, measured {row['measured_ms']:.1f} ms "
                  f"({row['error']:+.1%})")


if __name__ == "__main__":
    main()
