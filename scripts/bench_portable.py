"""Benchmark members in the user's own stack: does sentence-transformers, loading a member by itself,
score what the project scores?

For every member of a family of a sentence-transformers model (MiniLM): the project's STS-B Spearman
(`evaluate_family`, load_pruned) beside sentence-transformers' own EmbeddingSimilarityEvaluator on
`SentenceTransformer(member, trust_remote_code=True)`, run in a process that never imports
ziplm_planner. Prints a Markdown table for docs/BENCHMARKS.md.

    python scripts/bench_portable.py --family runs/minilm-family --data ../shared/data/stsb/sts-dev.csv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ziplm_planner.evaluate import evaluate_family

SENTENCE_TRANSFORMERS = """
import csv, json, sys
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator
with open(sys.argv[2], newline="") as handle:
    rows = [r for r in csv.reader(handle, delimiter="\\t", quoting=csv.QUOTE_NONE) if len(r) >= 7]
evaluator = EmbeddingSimilarityEvaluator([r[5] for r in rows], [r[6] for r in rows], [float(r[4]) / 5 for r in rows],
                                         main_similarity="cosine", write_csv=False)
model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
assert "ziplm_planner" not in sys.modules
embedding = model.encode(["A man is playing a guitar."])[0]
print(json.dumps({"spearman": evaluator(model)["spearman_cosine"], "norm": float((embedding ** 2).sum() ** 0.5),
                  "class": type(model[0].auto_model).__name__}))
"""


def sentence_transformers_score(member: Path, data: str) -> dict:
    with tempfile.TemporaryDirectory() as cwd:  # no ziplm_planner on the path, as in a user's project
        done = subprocess.run([sys.executable, "-c", SENTENCE_TRANSFORMERS, str(member), data], capture_output=True,
                              text=True, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"sentence-transformers failed on {member}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, required=True)
    parser.add_argument("--data", required=True, help="an STS-B file (sts-dev.csv)")
    args = parser.parse_args()
    ours = evaluate_family(args.family, "stsb", args.data)
    print("| member | project (load_pruned) | sentence-transformers (its own evaluator) | difference | "
          "embedding norm | class loaded |")
    print("|---|---|---|---|---|---|")
    for member, score in ours.items():
        theirs = sentence_transformers_score((args.family / member).resolve(), str(Path(args.data).resolve()))
        print(f"| {member} | {score / 100:.4f} | {theirs['spearman']:.4f} | {theirs['spearman'] - score / 100:+.5f} | "
              f"{theirs['norm']:.4f} | {theirs['class']} |")


if __name__ == "__main__":
    main()
