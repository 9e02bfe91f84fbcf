"""Benchmark a decoder family in llama.cpp: each member's model.gguf against the dense one's, interleaved,
as llama.cpp serves them, and its perplexity against the torch member's.

For every GGUF type asked (`export-gguf` writes each member's file; a family made on a llama.cpp table
is benchmarked on the files it ships, at its table's type, and at another type of `--types` on files
written to a scratch folder, its own untouched: how members planned at one type fare at another):
decode (one token after `--context` cached) and prefill (a `--prompt`-token prompt) timed in
llama-cpp-python, all members in the same rounds (p10 estimator, 90% bootstrap interval), next to the
speedup the family's own verification measured on its table's backend; and perplexity on windows of a
text through llama.cpp against the torch member's on the same windows. Prints Markdown for
docs/BENCHMARKS.md.

    python scripts/bench_llamacpp.py --family runs/smollm2 --text ../shared/data/wikitext2/wiki.valid.raw \
        --types f16,q8_0
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from benchlib import scratch_dir
from ziplm_planner.aliases import resolve_model
from ziplm_planner.environment import machine_info
from ziplm_planner.export import load_pruned, load_pruned_tokenizer
from ziplm_planner.family import MEMBER_GGUF, read_report
from ziplm_planner.gguf_export import export_family_gguf, vocabulary_for, write_gguf
from ziplm_planner.llamacpp import llama_cpp_module, perplexity, repacks, timed_call
from ziplm_planner.timing import TimingStats, interleaved_samples, speedup_interval


def windows_of(folder: Path, text: str, length: int, count: int) -> list[list[int]]:
    ids = load_pruned_tokenizer(folder)(text[: 200 * length * count])["input_ids"]
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def torch_perplexity(folder: Path, windows: list[list[int]]) -> float:
    model = load_pruned(folder)
    with torch.no_grad():
        losses = [float(model(torch.tensor([w]), labels=torch.tensor([w])).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def gguf_files(family: Path, report: dict, members: list[str], file_type: str) -> dict[str, Path]:
    """Each member's model.gguf at `file_type`: the family's own where it ships that type; written into the
    family where it ships none (as `export-gguf` does); else written to a scratch folder."""
    shipped = (report["metadata"].get("spec") or {}).get("gguf_type")
    if shipped is None:
        export_family_gguf(family, file_type)
    if shipped is None or shipped == file_type:
        return {name: family / name / MEMBER_GGUF for name in members}
    source, scratch = resolve_model(str(report["metadata"]["model"])), scratch_dir(f"bench-{file_type}-")
    return {name: write_gguf(load_pruned(family / name), scratch / f"{name}.gguf", vocabulary_for(source, family / name),
                             file_type) for name in members}


def speedups(files: dict[str, Path], mode: str, tokens: list[int], args, repacked: bool) -> dict:
    runners = {name: timed_call(path, mode, tokens, args.threads, repacked) for name, path in files.items()}
    samples = interleaved_samples(runners, args.rounds, 3, 0)
    dense = TimingStats.from_samples(samples["dense"]).estimate("p10")
    return {name: (dense / TimingStats.from_samples(samples[name]).estimate("p10"),
                   speedup_interval(samples["dense"], samples[name], "p10"), dense) for name in files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", type=Path, required=True)
    parser.add_argument("--text", required=True, help="raw text: the perplexity windows, and the prompt timed")
    parser.add_argument("--types", default=None,
                        help="GGUF types [default: a llama.cpp family's own type, else f16,q8_0]")
    parser.add_argument("--context", type=int, default=256, help="decode: tokens cached before the one timed")
    parser.add_argument("--prompt", type=int, default=128, help="prefill: prompt tokens")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--windows", type=int, default=8, help="perplexity: windows of 256 tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repacked", choices=("yes", "no", "auto"), default="auto",
                        help="llama.cpp's repacked weight buffers (auto: as the package times them; they crash on "
                             "q8_0 on an AMX Xeon)")
    args = parser.parse_args()
    llama_cpp_module()
    report = read_report(args.family)
    rows = {row["folder"]: row for row in report["members"]}
    members = list(rows)
    text = Path(args.text).read_text()
    context = windows_of(args.family / "dense", text, max(args.context, args.prompt), 1)[0]
    windows = windows_of(args.family / "dense", text, 256, args.windows)
    machine = machine_info()
    print(f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads; llama-cpp-python "
          f"{llama_cpp_module().__version__}; the family's table: {report['metadata'].get('table')} "
          f"({json.dumps(report['metadata'].get('spec'))})\n")
    torch_ppl = {name: torch_perplexity(args.family / name, windows) for name in members}
    shipped = (report["metadata"].get("spec") or {}).get("gguf_type")  # a family timed in llama.cpp: its own type
    for file_type in (args.types or shipped or "f16,q8_0").split(","):
        repacked = repacks(file_type) if args.repacked == "auto" else args.repacked == "yes"
        files = gguf_files(args.family, report, members, file_type)
        decode = speedups(files, "decode", context[: args.context + 1], args, repacked)
        prefill = speedups(files, "prefill", context[: args.prompt], args, repacked)
        ppl = {name: perplexity(path, windows, args.threads, repacked) for name, path in files.items()}
        print(f"**{file_type}** (repacked buffers: {'yes' if repacked else 'no'}); dense decode "
              f"{decode['dense'][2]:.2f} ms/token, prefill {prefill['dense'][2]:.1f} ms/{args.prompt} tokens\n")
        print("| member | target | verified speedup (table's backend) | llama.cpp decode | 90% interval | "
              "llama.cpp prefill | perplexity llama.cpp | perplexity torch | difference |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in members:
            row, (d, (lo, hi), _), (p, _, _) = rows[name], decode[name], prefill[name]
            verified = "-" if row.get("measured_speedup") is None else f"{row['measured_speedup']:.2f}x"
            print(f"| {name} | {row['target']:g}x | {verified} | {d:.2f}x | {lo:.2f}-{hi:.2f} | {p:.2f}x | "
                  f"{ppl[name]:.2f} | {torch_ppl[name]:.2f} | {ppl[name] / torch_ppl[name] - 1:+.2%} |")
        print()


if __name__ == "__main__":
    main()
