"""Benchmark where a shipped file is timed: a fresh process against one that has just trained.

A member's model.gguf (llama.cpp) or model.onnx (ONNX Runtime) is timed against the dense one's,
interleaved: first both loaded into this fresh process, with an untrained model of the member's shapes
beside them (the dense weights cut to its plan: do the trained weights themselves run slower?); then
after `--train-steps` steps of bf16 training of the member in torch, with the dense file loaded before
the training and again after it, and the member after it, as the verifier's runners were before it
timed its files in a process of their own (isolated.py).

    python scripts/bench_fresh_process.py --family runs/llamacpp-smollm2-gradual/ziplm-gradual --member x1.25 \
        --profile profiles/smollm2-cpu2-llamacpp-f16-b1d256.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from benchlib import scratch_dir
from ziplm_planner.backends import backend_for
from ziplm_planner.export import load_pruned, load_pruned_tokenizer, read_record
from ziplm_planner.kinds import kind_named
from ziplm_planner.aliases import ModelSource
from ziplm_planner.models import LoadedModel
from ziplm_planner.profiler import workload
from ziplm_planner.table import LatencyTable
from ziplm_planner.surgery import PruningPlan, apply_plan
from ziplm_planner.timing import TimingStats, interleaved_samples, speedup_interval


def speedup(samples: dict[str, list[float]], dense: str, member: str) -> str:
    """'1.269x (1.259-1.275)': the p10 speedup of `member` over `dense` in the same rounds, 90% interval."""
    low, high = speedup_interval(samples[dense], samples[member], "p10")
    ratio = TimingStats.from_samples(samples[dense]).estimate("p10") / TimingStats.from_samples(samples[member]).estimate("p10")
    return f"{ratio:.3f}x ({low:.3f}-{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, required=True, help="a family folder, finished or not")
    parser.add_argument("--profile", type=Path, required=True, help="the family's latency table: its spec is timed")
    parser.add_argument("--member", required=True)
    parser.add_argument("--train-steps", type=int, default=8, help="bf16 training steps of 512 tokens in between")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    spec = LatencyTable.load(args.profile).spec
    backend, scratch = backend_for(spec), scratch_dir("bench-fresh-")
    torch.set_num_threads(spec.threads)
    dense_folder, member_folder = args.family / "dense", args.family / args.member
    loaded = LoadedModel(load_pruned(dense_folder), load_pruned_tokenizer(dense_folder),
                         ModelSource("dense", str(dense_folder)), kind_named(read_record(dense_folder)["kind"]))
    work = workload(loaded, spec)
    dense_file, member_file = dense_folder / backend.member_file, member_folder / backend.member_file
    plan = PruningPlan.from_dict(json.loads((member_folder / "pruning.json").read_text())["plan"])
    untrained = backend.file(apply_plan(copy.deepcopy(loaded.model), plan), work, spec, scratch, "untrained")
    fresh = interleaved_samples({"dense": backend.file_runner(dense_file, work, spec),
                                 "member": backend.file_runner(member_file, work, spec),
                                 "untrained": backend.file_runner(untrained, work, spec)}, args.rounds, 3, 0)
    print(f"{spec.backend} {spec.mode}, {args.family} {args.member}; p10 speedups over the dense file, 90% interval\n")
    print("| where | member | untrained, same shapes |\n|---|---|---|")
    print(f"| fresh process | {speedup(fresh, 'dense', 'member')} | {speedup(fresh, 'dense', 'untrained')} |")

    runners = {"dense loaded before training": backend.file_runner(dense_file, work, spec)}
    model = load_pruned(member_folder).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    started = time.perf_counter()
    for _ in range(args.train_steps):
        ids = torch.randint(100, model.config.vocab_size, (1, 512))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained_for = time.perf_counter() - started
    runners["member"] = backend.file_runner(member_file, work, spec)
    runners["dense loaded after training"] = backend.file_runner(dense_file, work, spec)
    after = interleaved_samples(runners, args.rounds, 3, 0)
    print(f"| after {args.train_steps} bf16 training steps ({trained_for:.0f} s), against the dense file loaded "
          f"before them | {speedup(after, 'dense loaded before training', 'member')} | |")
    print(f"| the same rounds, against the dense file loaded after them | "
          f"{speedup(after, 'dense loaded after training', 'member')} | |")


if __name__ == "__main__":
    main()
