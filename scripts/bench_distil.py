"""Benchmark distillation losses: recover one pruned member with each weighting, same tokens and data.

Every variant starts from the same saved member and trains on the same batches (one seed) for the
same budget; only the loss weights (task, KL, SquareHead), temperature or learning rate differ.
Each trained copy is scored on the evaluation data (perplexity for causal LMs, STS-B Spearman
otherwise), beside the member as pruned. This is how the recovery defaults are chosen.

    python scripts/bench_distil.py --model smollm2 --member runs/samples512-smollm2/held-out/x1.25 \
        --train-data ../shared/data/wikitext2/wiki.train.head.raw --eval ../shared/data/wikitext2/wiki.valid.raw \
        --variants "1,1,1:2;1,1,0:2;0,1,0:1;1,1,1:2@3e-4" --tokens 32000,128000 --batch-size 4 --eval-tokens 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import ziplm_planner as zp
from benchlib import add_training_arguments, parse_loss_weights
from ziplm_planner.environment import machine_info
from ziplm_planner.evaluate import perplexity, stsb_spearman
from ziplm_planner.export import load_pruned
from ziplm_planner.family import manifest_source
from ziplm_planner.kinds import CAUSAL_LM
from ziplm_planner.recovery import for_model, load_training_data
from ziplm_planner.settings import LossWeights, TrainSettings
from ziplm_planner.spec import InferenceSpec
from ziplm_planner.train import distil, make_accelerator


def parse_variants(text: str) -> list[tuple[LossWeights, float | None]]:
    """'1,1,1:2;0,1,0:1@3e-4' -> (loss weights, learning rate or None) per variant: the three weights,
    optionally a colon and the temperature, optionally @ a learning rate; variants split by ';'."""
    variants = []
    for item in filter(None, text.split(";")):
        item, _, rate = item.partition("@")
        variants.append((parse_loss_weights(item), float(rate) if rate else None))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="the dense model: the teacher")
    parser.add_argument("--member", type=Path, required=True, help="a member folder of a family of --model")
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--variants", default="1,1,1:2",
                        help="task,kl,squarehead[:temperature][@learning rate], separated by ';'")
    parser.add_argument("--tokens", default="32000",
                        help="training budgets, comma-separated: every variant is trained afresh at each")
    add_training_arguments(parser)
    parser.add_argument("--eval-tokens", type=int, default=None, help="perplexity: score the first N tokens")
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    causal = loaded.kind is CAUSAL_LM
    metric = "perplexity" if causal else "STS-B Spearman x100"

    def score(model) -> float:
        if causal:
            return perplexity(model, loaded.tokenizer, args.eval, max_tokens=args.eval_tokens)
        return stsb_spearman(model, loaded.tokenizer, args.eval)

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; teacher {args.model}; member {args.member}")
    shape = for_model(loaded, TrainSettings(batch_size=args.batch_size, seq_len=args.seq_len),
                      InferenceSpec(**manifest_source(args.member.parent)["table"]).calibration_length)
    data = load_training_data(loaded, [args.train_data], shape.seq_len, 0, "--train-data file")
    accelerator = make_accelerator(precision=args.precision)
    print(f"{data.num_tokens:,} training tokens in {args.train_data}, batch {shape.batch_size} x {shape.seq_len}, "
          f"autocast {accelerator.mixed_precision}")
    rows = [("dense", "", score(loaded.model), "", 0.0), ("as pruned", "", score(load_pruned(args.member)), "", 0.0)]
    print(f"dense {rows[0][2]:.2f}, member as pruned {rows[1][2]:.2f} ({metric})")
    for budget in (int(tokens) for tokens in args.tokens.split(",")):
        for weights, rate in parse_variants(args.variants):
            student = load_pruned(args.member)
            settings = dataclasses.replace(shape, tokens=budget, learning_rate=rate or args.learning_rate, weights=weights,
                                           precision=args.precision).for_kind(loaded.kind)
            started = time.perf_counter()
            record = distil(student, loaded.model, loaded.kind, data, settings, accelerator)
            label = (f"task {weights.task:g}, kl {weights.kl:g}, squarehead {weights.squarehead:g}, "
                     f"T {weights.temperature:g}, lr {settings.learning_rate:g}")
            # the task loss of the last logged steps, on training text: beside the score, it shows over-fitting
            train_task = f"{record.final['task']:.3f}" if "task" in record.final else ""
            rows.append((label, f"{record.tokens:,}", score(student), train_task, time.perf_counter() - started))
            print(f"{label}: {rows[-1][2]:.2f} after {record.tokens:,} tokens, {record.tokens_per_second:.0f} tok/s")
    print(f"\n| variant | tokens | {metric} | final training task loss | seconds |\n|---|---|---|---|---|")
    for label, tokens, value, train_task, seconds in rows:
        print(f"| {label} | {tokens} | {value:.2f} | {train_task} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
