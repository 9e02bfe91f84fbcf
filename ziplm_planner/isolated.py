"""Timing shipped files in a process of their own, as a server loads them.

The same file times differently in a process that has pruned and trained for an hour: a SmolLM2 member
re-timed in its training process measured 1.12x, and 1.27x loaded into a new process next to the dense
file (docs/BENCHMARKS.md, issue 32). So the verifier writes the files a member ships and times them,
dense and member interleaved, in a new Python process (`python -m ziplm_planner.isolated JOB SAMPLES`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .backends import backend_for
from .profiler import Workload
from .spec import InferenceSpec
from .timing import interleaved_samples


def isolated_samples(files: dict[str, Path], work: Workload, spec: InferenceSpec, rounds: int, warmup: int,
                     seed: int) -> dict[str, list[float]]:
    """Milliseconds of every file in every round (`interleaved_samples`), timed in a new process."""
    with tempfile.TemporaryDirectory(prefix="ziplm-timing-") as tmp:
        job, samples = Path(tmp) / "job.pt", Path(tmp) / "samples.json"
        torch.save({"files": {name: str(path) for name, path in files.items()}, "inputs": work.inputs,
                    "names": work.names, "tokens": work.tokens, "spec": spec.to_dict(), "rounds": rounds,
                    "warmup": warmup, "seed": seed}, job)
        done = subprocess.run([sys.executable, "-m", "ziplm_planner.isolated", str(job), str(samples)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"timing {', '.join(map(str, files.values()))} in a process of their own failed "
                               f"(exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(samples.read_text())


def main(job: str, samples: str) -> None:
    task = torch.load(job)
    spec = InferenceSpec(**task["spec"])
    backend = backend_for(spec)
    # what running a file reads of a workload: its inputs and token ids (no module to call, no tokenizer to write)
    work = Workload(task["inputs"], task["names"], None, None, task["tokens"], None)
    runners = {name: backend.file_runner(Path(path), work, spec) for name, path in task["files"].items()}
    timed = interleaved_samples(runners, task["rounds"], task["warmup"], task["seed"], backend.synchronizer(spec))
    Path(samples).write_text(json.dumps(timed))


if __name__ == "__main__":
    main(*sys.argv[1:])
