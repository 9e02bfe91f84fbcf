"""Benchmark one-shot compression: quality, measured speedups and planner cost.

MiniLM (default): STS-B dev Spearman of each member against the dense model, on a family made
from STS-B train sentences and a latency table. Causal LMs: WikiText-2 perplexity. Several
--calibration-inputs (comma-separated) make one family each, in turn, on one level database.
`--attention-levels all,whole-groups` also makes each family from the table without its levels
that keep fewer than all query heads of a KV group: what removing query heads inside groups buys.
`--block-errors fisher,relative` makes each family with both block error weightings, and
`--score-on held-out,calibration` with SPDY scoring on held-out samples and on the Hessians' own.

    python scripts/bench_compress.py --profile profiles/minilm-cpu2-onnxruntime-b8s128.json \
        --targets 1.5,2,3,5 --calib ../shared/data/stsb/sts-train.csv --eval ../shared/data/stsb/sts-dev.csv \
        --calibration-inputs dense,corrected
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import add_compress_arguments, compress_settings, scratch_dir, task_of
from ziplm_planner.evaluate import perplexity, retained, stsb_spearman
from ziplm_planner.export import load_pruned
from ziplm_planner.family import parse_targets
from ziplm_planner.settings import PERPLEXITY_SEQ_LEN, CompressSettings
from ziplm_planner.table import LatencyTable, record_level

ATTENTION_LEVELS = ("all", "whole-groups")


def score(model, loaded, args) -> float:
    if task_of(loaded) == "perplexity":
        return perplexity(model, loaded.tokenizer, args.eval, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    return stsb_spearman(model, loaded.tokenizer, args.eval)


def table_for(profile: str, attention_levels: str, workdir: Path) -> str:
    """The table itself, or a copy holding only the attention levels that keep whole KV groups."""
    if attention_levels == "all":
        return profile
    table = LatencyTable.load(profile)
    per_group = table.shape.q_per_unit
    table.records = [r for r in table.records if r["block"] != "attention" or record_level(r, table.shape).heads == per_group]
    return str(table.save(workdir / f"whole-groups-{Path(profile).name}"))


def main() -> None:
    defaults = CompressSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compress_arguments(parser, targets="1.5,2,3,5")
    parser.add_argument("--extra-target", type=float, default=None, help="added in a second, cached run")
    parser.add_argument("--eval", required=True)
    parser.add_argument("--calibration-inputs", default=defaults.calibration_inputs)
    parser.add_argument("--attention-levels", default="all", help=f"comma-separated, of {', '.join(ATTENTION_LEVELS)}")
    parser.add_argument("--block-errors", default=defaults.block_errors, help="comma-separated, of fisher, relative")
    parser.add_argument("--score-on", default=defaults.score_on, help="comma-separated, of held-out, calibration")
    parser.add_argument("--eval-seq-len", type=int, default=PERPLEXITY_SEQ_LEN)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    out = args.out or scratch_dir("bench-family-")  # without --out the families are scratch too
    cache = scratch_dir("bench-cache-")
    targets = parse_targets(args.targets)
    dense_score = score(loaded.model, loaded, args)
    metric = "perplexity" if task_of(loaded) == "perplexity" else "STS-B Spearman"
    summary = {}
    choices = [args.calibration_inputs.split(","), args.attention_levels.split(","), args.block_errors.split(","),
               args.score_on.split(",")]
    variants = list(itertools.product(*choices))
    if unknown := {levels for _, levels, _, _ in variants} - set(ATTENTION_LEVELS):
        parser.error(f"--attention-levels {', '.join(sorted(unknown))}: expected {', '.join(ATTENTION_LEVELS)}")
    varied = [len(c) > 1 for c in choices]
    labels = [", ".join(v for v, shown in zip(variant, varied) if shown) or variant[0] for variant in variants]
    for (inputs, levels, block_errors, score_on), label in zip(variants, labels):
        folder = out / label.replace(", ", "-")
        profile = table_for(args.profile, levels, cache)
        settings = compress_settings(args, cache, calibration_inputs=inputs, block_errors=block_errors,
                                     score_on=score_on)
        started = time.perf_counter()
        report = zp.compress(loaded, profile, targets, args.calib, folder, settings=settings, overwrite=True)
        seconds = time.perf_counter() - started
        print(f"\nmodel {args.model}, {args.num_samples} calibration samples from {args.calib}, "
              f"calibration inputs {inputs}, attention levels {levels}, block errors {block_errors}, "
              f"SPDY scored on {score_on} samples, table {args.profile}")
        print(f"| member | target | predicted | measured (p10) | measured (median) | met | params | {metric} | retained |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in report.rows:
            value = dense_score if row["folder"] == "dense" else score(load_pruned(folder / row["folder"]), loaded, args)
            summary.setdefault(row["folder"], {})[label] = (value, row["measured_speedup"])
            print(f"| {row['folder']} | {row['target']:g}x | {row['predicted_speedup']:.2f}x | "
                  f"{row['measured_speedup']:.2f}x | {row['speedup_median']:.2f}x | {'yes' if row['met_target'] else 'NO'} | "
                  f"{row['parameters']:,} | {value:.2f} | {retained(value, dense_score, task_of(loaded)):.1%} |")
        db = report.metadata["level_database"]
        print(f"level database: {db['seconds']:.1f} s ({db['samples']} samples, {db['tokens']} tokens); "
              f"whole compress of {len(targets)} targets: {seconds:.1f} s")
        if args.extra_target:
            started = time.perf_counter()
            zp.compress(loaded, profile, [*targets, args.extra_target], args.calib, folder, settings=settings,
                        overwrite=True)
            again = time.perf_counter() - started
            print(f"adding target {args.extra_target:g}x to the cached run: {again:.1f} s "
                  f"({again / seconds - 1:+.0%} vs the first run)")
    print(f"\n{metric} by variant (measured speedup in brackets)")
    print("| member | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for member, cells in summary.items():
        print(f"| {member} | " + " | ".join(f"{cells[m][0]:.2f} ({cells[m][1]:.2f}x)" for m in labels) + " |")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
