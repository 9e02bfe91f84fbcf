"""Benchmark recovery: one-shot against oneshot + distillation against gradual, and GMP*, at the same budget.

Every family (a method and a recovery mode) compresses the same model on the same table,
calibration data and targets (the level database is shared through one cache); the recovered
ones train each member on the same number of tokens. Each family is scored on the evaluation
data, and the frontiers are plotted together. A family already in --out with the same settings
is continued, its finished members reused (so targets can be added to an earlier run).

    python scripts/bench_recovery.py --profile profiles/minilm-cpu2-onnxruntime-b8s128.json \
        --targets 2,3,5,8 --calib ../shared/data/stsb/sts-train.csv --eval ../shared/data/stsb/sts-dev.csv \
        --train-tokens 100000 --out runs/recovery
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import (add_compress_arguments, add_training_arguments, compress_settings, parse_loss_weights,
                      scratch_dir, task_of)
from ziplm_planner.environment import machine_info
from ziplm_planner.evaluate import evaluate_family, retained
from ziplm_planner.family import read_report
from ziplm_planner.family import parse_targets
from ziplm_planner.plot import plot_frontier, read_families
from ziplm_planner.progress import show_stages
from ziplm_planner.settings import RecoverySettings, TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_compress_arguments(parser, targets="2,3,5,8")
    parser.add_argument("--train-data", default=None, help="default: the calibration file")
    parser.add_argument("--eval", required=True)
    parser.add_argument("--families", default="ziplm:none,ziplm:oneshot,ziplm:gradual,magnitude:gradual",
                        help="method:recovery[:prune steps] (gradual only); magnitude:gradual is GMP*; empty: only "
                             "--compare")
    parser.add_argument("--train-tokens", type=int, default=100_000)
    add_training_arguments(parser)
    parser.add_argument("--loss-weights", default=None,
                        help="task,kl,squarehead[:temperature], as bench_distil's (default: the CLI's)")
    parser.add_argument("--eval-tokens", type=int, default=None, help="perplexity: score the first N tokens")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="level-database cache to keep, so a rerun that resumes a family loads the dense model's "
                             "database instead of building it again [default: a scratch folder removed at exit]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="families of earlier runs to put beside these in the table and plot (scored here if "
                             "their reports are not)")
    args = parser.parse_args()
    show_stages()  # a family trains for hours: its log says how far it has come

    loaded = zp.load_model(args.model)
    task = task_of(loaded)
    cache = args.cache_dir or scratch_dir("bench-cache-")
    train = TrainSettings(tokens=args.train_tokens, learning_rate=args.learning_rate, batch_size=args.batch_size,
                          seq_len=args.seq_len, precision=args.precision,
                          **({"weights": parse_loss_weights(args.loss_weights)} if args.loss_weights else {}))
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; model {args.model}; table {args.profile}")
    if args.families:
        print(f"{args.train_tokens:,} training tokens per member from {args.train_data or args.calib}, "
              f"batch {args.batch_size or 'default'} x {args.seq_len or 'default'} tokens, learning rate "
              f"{args.learning_rate:g}, precision {args.precision}, loss weights {args.loss_weights or 'default'}")
    folders = []
    for family in filter(None, args.families.split(",")):
        method, mode, *steps = family.split(":")
        prune_steps = int(steps[0]) if steps else 1
        folder = args.out / (f"{method}-{mode}" + (f"-{prune_steps}steps" if prune_steps > 1 else ""))
        started = time.perf_counter()
        recovery = RecoverySettings(mode, args.train_data, train, prune_steps)
        report = zp.compress(loaded, args.profile, parse_targets(args.targets), args.calib, folder,
                             settings=compress_settings(args, cache, method=method, recovery=recovery), overwrite=True)
        seconds = time.perf_counter() - started
        evaluate_family(folder, task, args.eval, max_tokens=args.eval_tokens)
        trained = [row for row in report.rows if row.get("train_tokens")]
        speed = sum(r["train_tokens"] for r in trained) / max(sum(r["train_seconds"] for r in trained), 1e-9)
        print(f"{family}: this run {seconds:.0f} s (members reused from an earlier run cost nothing here)"
              + (f"; training {sum(r['train_seconds'] for r in trained):.0f} s, {speed:.0f} tokens/s" if trained else ""))
        folders.append(folder)
    for folder in args.compare:  # a family of another script may not be scored in its report yet
        if any(task not in (row.get("scores") or {}) for row in read_report(folder)["members"]):
            evaluate_family(folder, task, args.eval, max_tokens=args.eval_tokens)
    folders += args.compare
    rows = {folder.name: {row["folder"]: row for row in read_report(folder)["members"]} for folder in folders}
    members = list(rows[folders[0].name])
    print(f"\n{task} ({'lower' if task == 'perplexity' else 'higher'} is better); measured speedup in brackets")
    print("| member | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for member in members:
        cells = []
        for family in rows.values():
            if member not in family:
                cells.append("not run")
                continue
            value, dense = family[member]["scores"][task], family["dense"]["scores"][task]
            cells.append(f"{value:.2f} ({family[member]['measured_speedup']:.2f}x, {retained(value, dense, task):.1%})")
        print(f"| {member} | " + " | ".join(cells) + " |")
    written = plot_frontier(read_families(folders), args.out / "frontier.png", task=task)
    print("curves:", json.dumps({folder.name: [(p["tokens"], round(p["loss"], 4)) for p in
                                               (json.loads((folder / members[-1] / "measurement.json").read_text())
                                                .get("training") or {}).get("curve", [])[::10]] for folder in folders
                                 if (folder / members[-1] / "measurement.json").exists()}))
    print("wrote", ", ".join(map(str, written)),
          f"; peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
