"""Benchmark what a user deploys: shipped files against their targets, and seeded reproducibility.

1. The dense model exported as members ship (dynamic batch and sequence axes) against a
   static-shape export of the same model, timed interleaved in ONNX Runtime: why the profiler and
   the verifier time the shipped kind of file.
2. Two compress runs with the same seed, table and data (each with its own level-database cache):
   are their pruning.json files byte-identical, and if not, which member differs and why.
3. Every member's shipped model.onnx of the first run re-timed against dense/model.onnx
   (`verify_family`): is each within the band compress accepts (`verify.verdict`) around its target?

    python scripts/bench_release.py --profile profiles/minilm-cpu2-onnxruntime-b8s128.json \
        --targets 1.5,2,3 --calib ../shared/data/stsb/sts-train.csv --out runs/release
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import scratch_dir
from ziplm_planner.backends import (export_model_onnx, export_onnx, input_names, model_call, onnx_runner,
                                   padded_for_tracing, random_inputs)
from ziplm_planner.environment import machine_info
from ziplm_planner.family import parse_targets
from ziplm_planner.retime import verify_family
from ziplm_planner.settings import CompressSettings
from ziplm_planner.table import LatencyTable
from ziplm_planner.timing import TimingStats, interleaved_samples, speedup_interval
from ziplm_planner.verify import OVERSHOOT, SPEEDUP_TOLERANCE, verdict


def static_vs_shipped(loaded, table: LatencyTable, rounds: int) -> None:
    spec = table.spec
    names = input_names(loaded.model, loaded.tokenizer)
    inputs = random_inputs(loaded.model, names, spec.batch_size, spec.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = export_model_onnx(loaded.model, loaded.kind, names, Path(tmp) / "shipped.onnx")
        static = export_onnx(model_call(loaded.model, loaded.kind, names), padded_for_tracing(inputs),
                             Path(tmp) / "static.onnx", [loaded.kind.output_name])
        samples = interleaved_samples({"shipped": onnx_runner(shipped, inputs, spec),
                                       "static": onnx_runner(static, inputs, spec)}, rounds)
    low, high = speedup_interval(samples["static"], samples["shipped"], table.estimator)
    stats = {k: TimingStats.from_samples(v) for k, v in samples.items()}
    print(f"dense model, batch {spec.batch_size} x {spec.seq_len}, {rounds} interleaved rounds: shipped (dynamic axes) "
          f"{stats['shipped'].p10_ms:.1f} ms p10 / {stats['shipped'].median_ms:.1f} median, static-shape export "
          f"{stats['static'].p10_ms:.1f} / {stats['static'].median_ms:.1f}: static is "
          f"{stats['static'].p10_ms / stats['shipped'].p10_ms:.3f}x slower (90% interval {low:.3f}-{high:.3f})")


def compare_runs(first: Path, second: Path, rows: list[dict]) -> None:
    for row in rows:
        a, b = (run / row["folder"] / "pruning.json" for run in (first, second))
        same = a.read_bytes() == b.read_bytes()
        print(f"  {row['folder']}: pruning.json {'identical' if same else 'DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--targets", default="1.5,2,3")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--rounds", type=int, default=60, help="rounds for the export comparison and the re-timing")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    table = LatencyTable.load(args.profile)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; model {args.model}; table {args.profile}")
    static_vs_shipped(loaded, table, args.rounds)

    targets = parse_targets(args.targets)
    reports = []
    for name in ("run-a", "run-b"):
        cache = scratch_dir("bench-cache-")
        started = time.perf_counter()
        reports.append(zp.compress(loaded, table, targets, args.calib, args.out / name,
                                   settings=CompressSettings(cache_dir=cache), overwrite=True))
        print(f"{name}: {time.perf_counter() - started:.0f} s; " + "; ".join(
            f"{r['folder']} {r['measured_speedup']:.3f}x {r['status']} after {r['replans']} re-plans "
            f"(tried {r['speedups_tried']})" for r in reports[-1].rows[1:]))
    print("same seed, table and data, two runs:")
    compare_runs(args.out / "run-a", args.out / "run-b", reports[0].rows)

    print(f"shipped model.onnx of run-a re-timed against dense/model.onnx, {args.rounds} interleaved rounds:")
    print(f"| member | target | speedup (p10) | 90% interval | speedup (median) | in {SPEEDUP_TOLERANCE:.2f}-{OVERSHOOT:.2f}x |")
    print("|---|---|---|---|---|---|")
    for r in verify_family(args.out / "run-a", rounds=args.rounds)[1:]:
        met = verdict(r["speedup"], r["target"]) == "met"
        print(f"| {r['folder']} | {r['target']:g}x | {r['speedup']:.3f}x | {r['interval'][0]:.3f}-{r['interval'][1]:.3f} "
              f"| {r['speedup_median']:.3f}x | {'yes' if met else 'NO'} ({r['speedup'] / r['target']:.3f}) |")


if __name__ == "__main__":
    main()
