"""Benchmark the profiler through a noisy spell: does profiling again recover a sound table?

Profiles the model three ways, one after another on the same backend:
1. quiet: the reference, nothing else running, `--retries 0`;
2. a spell, `--retries 0`: a busy process takes `--load-cores` cores for the first `--spell` seconds
   (by default as long as the quiet profile took);
3. the same spell, the default `--retries`.
Each table is then judged by how well it predicts the speedups of the pruned whole models the quiet
profile measured (its additivity check), and by its own trust checks. The tables are written to `--out`.
Run it on an otherwise idle machine: the only load must be the one it makes.

    python scripts/bench_profile_noise.py [--model minilm] [--backend torch] [--spell SECONDS] [--load-cores 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import add_profile_arguments, profile_spec
from ziplm_planner.environment import machine_info
from ziplm_planner.settings import ProfileSettings
from ziplm_planner.spec import InferenceSpec

BUSY_LOOP = "while True: pass"


def start_spell(cores: int, seconds: float) -> list[subprocess.Popen]:
    """`cores` busy processes, each stopped after `seconds`."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(cores)]
    for process in busy:
        timer = threading.Timer(seconds, process.kill)
        timer.daemon = True  # a profile that ends first kills its spell itself; the script need not wait
        timer.start()
    return busy


def speedup_errors(table, reference) -> list[float]:
    """`table`'s relative error on the speedup of each pruned whole model the quiet reference measured
    (its own dense model first). Speedups, not milliseconds: they are what a plan is made of, and they
    hold while the VM as a whole drifts a few percent between profiles."""
    dense, *pruned = reference.additivity
    return [(table.dense_ms / table.predict(row["kept"])) / (dense["measured_ms"] / row["measured_ms"]) - 1
            for row in pruned]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_profile_arguments(parser)
    parser.add_argument("--backend", default=InferenceSpec().backend)
    parser.add_argument("--spell", type=float, default=None,
                        help="seconds the busy processes run [default: as long as the quiet profile took]")
    parser.add_argument("--load-cores", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-noise"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    loaded = zp.load_model(args.model)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; model {args.model}, {args.backend}, "
          f"batch {args.batch_size} x {args.seq_len}")

    def profile(retries: int, spell: bool):
        name = f"{'spell' if spell else 'quiet'}-retries{retries}"
        busy = start_spell(args.load_cores, args.spell) if spell else []
        started = time.perf_counter()
        table = zp.profile(loaded, args.out / f"{name}.json", spec=profile_spec(args, backend=args.backend),
                           settings=ProfileSettings(rounds=args.rounds, retries=retries))
        seconds = time.perf_counter() - started
        for process in busy:
            process.kill()
            process.wait()
        return table, seconds

    runs = {"quiet, --retries 0": profile(0, spell=False)}
    reference, quiet_seconds = runs["quiet, --retries 0"]
    if args.spell is None:
        args.spell = round(quiet_seconds)
    print(f"spell: {args.load_cores} busy core(s) for {args.spell:g} s from the start of each profile")
    runs["spell, --retries 0"] = profile(0, spell=True)
    retries = ProfileSettings().retries
    runs[f"spell, --retries {retries}"] = profile(retries, spell=True)

    print("| profile | attempts | seconds | dense predicted (ms) | others' CPU share | own additivity median / max | "
          "speedup error on the quiet whole models, median / max | trust problems |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (table, seconds) in runs.items():
        own_median, own_max = table.additivity_errors()
        errors = [abs(e) for e in speedup_errors(table, reference)]
        problems = "; ".join(table.trust_problems()) or "none"
        print(f"| {name} | {table.metadata['attempts']} | {seconds:.0f} | {table.dense_ms:.1f} | "
              f"{table.metadata['others_cpu_share']:.0%} | {own_median:.1%} / {own_max:.1%} | "
              f"{statistics.median(errors):.1%} / {max(errors):.1%} | {problems} |")


if __name__ == "__main__":
    main()
