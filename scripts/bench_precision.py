"""Benchmark training throughput in float32 against bf16 autocast, interleaved, on this machine.

One recovery training step (student forward and backward with every hidden state, teacher forward,
the distillation loss, an AdamW step) is timed in turns under each precision, so drifts of a
shared VM hit both alike. The student is a copy of the dense model. Prints the median tokens/s of
each and the ratio with its spread over rounds. What `--train-precision auto` chooses rests on it.

    python scripts/bench_precision.py --model smollm2 --batch-size 4 --seq-len 128 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import ziplm_planner as zp
from ziplm_planner.distill import distillation_terms
from ziplm_planner.environment import machine_info
from ziplm_planner.settings import TrainSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per timed step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per precision and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    loaded = zp.load_model(args.model)
    teacher = loaded.model.eval()
    student = copy.deepcopy(teacher).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)  # small: the weights barely move between turns
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, loaded.tokenizer.vocab_size, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    weights = TrainSettings().for_kind(loaded.kind).weights

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # what accelerate's bf16 does on a CPU
            student_out = student(**batch, output_hidden_states=True)
            with torch.no_grad():
                teacher_out = teacher(**batch, output_hidden_states=True)
            loss = distillation_terms(loaded.kind, student_out, teacher_out, batch, weights)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    tokens = args.batch_size * args.seq_len * args.steps
    rates: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in rates:
            step(name == "bf16")  # untimed: the first step of a turn pays for switching kernels
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name == "bf16")
            rates[name].append(tokens / (time.perf_counter() - started))
    ratios = sorted(b / f for f, b in zip(rates["float32"], rates["bf16"]))
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; AMX: {torch.cpu._is_amx_tile_supported()}, "
          f"AVX-512 BF16: {torch.cpu._is_avx512_bf16_supported()}; "
          f"model {args.model}, batch {args.batch_size} x {args.seq_len}, {args.rounds} rounds of {args.steps} steps")
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.0f} tokens/s (range {min(values):.0f}-{max(values):.0f})")
    print(f"bf16 / float32: median {statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    main()
