"""How latency tables of one model differ between backends, and what that does to the plans.

For each table: the dense model's predicted time, the fixed part's share of it, a whole attention
block's and a whole FFN block's time per layer, and the cost of one query head against one FFN
neuron (the exchange rate the search trades them at). Then every member of the families given,
as planned, predicted on every table: a plan cut for one backend's costs lands elsewhere on
another's. Prints Markdown for docs/BENCHMARKS.md; reads files only, times nothing.

    python scripts/compare_tables.py profiles/smollm2-cpu2-torch-b1s128.json \
        profiles/smollm2-cpu2-onnxruntime-b1d256.json profiles/smollm2-cpu2-llamacpp-f16-b1d256.json \
        --families runs/smollm2-torch-family runs/smollm2-llamacpp-family
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ziplm_planner.aliases import MEMBER_RECORD
from ziplm_planner.family import read_report
from ziplm_planner.surgery import PruningPlan
from ziplm_planner.table import ATTENTION, FFN, LatencyTable


def describe(table: LatencyTable) -> str:
    shape = table.shape
    attention, ffn = table.time(ATTENTION, shape.full_attention), table.time(FFN, shape.intermediate_size)
    head, neuron = attention / shape.num_heads, ffn / shape.intermediate_size
    return (f"| {table.path.name} | {table.dense_ms:.2f} | {table.fixed_share:.1%} | {attention:.3f} | {ffn:.3f} | "
            f"{attention / ffn:.2f} | {head / neuron:.0f} | {table.max_speedup:.2f}x |")


def predicted_speedups(families: list[Path], tables: list[LatencyTable]) -> list[str]:
    lines = ["| family | member | " + " | ".join(t.path.name for t in tables) + " |", "|---|---|" + "---|" * len(tables)]
    for family in families:
        for row in read_report(family)["members"]:
            if row["target"] == 1:
                continue
            record = json.loads((family / row["folder"] / MEMBER_RECORD).read_text())
            kept = PruningPlan.from_dict(record["plan"]).kept_counts()
            cells = [f"{t.dense_ms / t.predict(kept):.2f}x" for t in tables]
            lines.append(f"| {family.name} | {row['folder']} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--families", nargs="*", type=Path, default=[], help="families whose members to predict")
    args = parser.parse_args()
    tables = [LatencyTable.load(path) for path in args.tables]
    print("| table | dense (ms) | fixed share | attention / layer (ms) | FFN / layer (ms) | attention / FFN "
          "| one query head / one neuron | max speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for table in tables:
        print(describe(table))
    if args.families:
        print("\nEach member's plan, predicted on each table (the table it was planned on gives about its target):\n")
        print("\n".join(predicted_speedups(args.families, tables)))


if __name__ == "__main__":
    main()
