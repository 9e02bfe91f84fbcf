"""Latency lookup tables: block times per pruned size on one machine, backend and spec.

Predicted latency of a configuration (DESIGN.md, "Latency table"):
    T = scale * (fixed + sum over layers of attention(k_l) + ffn(n_l))
with attention(0) = ffn(0) = 0 (a removed block). `scale` is fitted on whole models measured
by the profiler: a block timed alone runs with its weights hot in cache, a whole model streams
all of them, so the sum is uniformly a few percent low. A uniform factor cancels in every
speedup; it only makes absolute predictions right. The table records how far each measured
whole model was from the prediction (leave-one-out), so additivity is checked, not assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .adapters import ATTENTION, FFN, ModelShape
from .atomic import atomic_write_text
from .errors import UserError
from .spec import InferenceSpec
from .timing import ESTIMATORS

FORMAT = "ziplm-planner/latency-table/v1"
FIXED = "fixed"
ADDITIVITY_MEDIAN, ADDITIVITY_MAX = 0.05, 0.10  # |predicted / measured - 1| of whole models a sound table keeps
WHOLE_MODEL_SPREAD = 1.5  # median p90/p10 of whole-model timings above which the machine was too noisy
BUSY_LOAD = 0.5  # load average per core before profiling above which something else was running
TRUST_ADVICE = ("profile again on a quiet machine (stop other jobs; `uptime` shows the load) "
                "or with more --rounds; speedups planned from this table may miss")


@dataclass
class LatencyTable:
    spec: InferenceSpec
    shape: ModelShape
    estimator: str
    records: list[dict]  # block, level, time_ms (the estimate), min_ms, p10_ms, median_ms, p90_ms, runs
    additivity: list[dict] = field(default_factory=list)  # whole models: kept, predicted_ms, measured_ms, error
    metadata: dict = field(default_factory=dict)  # model, machine, versions, created, settings, seconds
    scale: float = 1.0  # measured whole model / sum of block times

    # --- lookups ---------------------------------------------------------------------------

    def levels(self, block: str) -> list[int]:
        return sorted(r["level"] for r in self.records if r["block"] == block)

    def times(self, block: str) -> list[float]:
        """Estimated ms at each of `levels(block)`."""
        by_level = {r["level"]: r["time_ms"] for r in self.records if r["block"] == block}
        return [by_level[level] for level in self.levels(block)]

    def time(self, block: str, kept: int) -> float:
        """Block time at `kept` structures; between table levels, linear interpolation."""
        if kept == 0:
            return 0.0
        return float(np.interp(kept, self.levels(block), self.times(block)))

    @property
    def fixed_ms(self) -> float:
        return next(r["time_ms"] for r in self.records if r["block"] == FIXED)

    def block_sum(self, kept_counts: list[tuple[int, int]]) -> float:
        """fixed + sum of block times, unscaled: the quantity the search budgets."""
        return self.fixed_ms + sum(self.time(ATTENTION, a) + self.time(FFN, f) for a, f in kept_counts)

    def predict(self, kept_counts: list[tuple[int, int]]) -> float:
        """Predicted ms of a model keeping (attention units, FFN neurons) per layer."""
        return self.scale * self.block_sum(kept_counts)

    def block_budget(self, total_ms: float) -> float:
        """The budget for the sum of block times that gives a model of `total_ms`."""
        return total_ms / self.scale - self.fixed_ms

    @property
    def dense_ms(self) -> float:
        return self.predict([(self.shape.attention_units, self.shape.intermediate_size)] * self.shape.num_layers)

    @property
    def max_speedup(self) -> float:
        """The speedup of the fastest model that still has a block: the fixed part plus the cheapest
        block. Past it the only plan is a model with every layer removed, which is no language model."""
        cheapest = min(min(self.times(ATTENTION)), min(self.times(FFN)))
        return self.dense_ms / (self.scale * (self.fixed_ms + cheapest))

    def additivity_errors(self) -> tuple[float, float]:
        """Median and max |predicted / measured - 1| over the whole models measured."""
        errors = [abs(a["error"]) for a in self.additivity]
        return (float(np.median(errors)), float(max(errors))) if errors else (float("nan"), float("nan"))

    def trust_problems(self) -> list[str]:
        """Why this table's figures may not hold, each with what to do; empty when it looks sound.
        Judged by what the profiler saw: whole models against the block sum, the spread of whole-model
        timings (short blocks always spread; whole models on a quiet machine stay within ~1.1-1.45x),
        and the load on the machine when profiling began."""
        problems = []
        median, worst = self.additivity_errors()
        if median > ADDITIVITY_MEDIAN or worst > ADDITIVITY_MAX:
            problems.append(f"whole models differ from the block sum by {median:.1%} median, {worst:.1%} max "
                            f"(sound: <= {ADDITIVITY_MEDIAN:.0%} / {ADDITIVITY_MAX:.0%})")
        spreads = [a["measured"]["p90_ms"] / a["measured"]["p10_ms"] for a in self.additivity if "measured" in a]
        if spreads and float(np.median(spreads)) > WHOLE_MODEL_SPREAD:
            problems.append(f"whole-model timings spread {float(np.median(spreads)):.2f}x p90/p10 "
                            f"(sound: <= {WHOLE_MODEL_SPREAD})")
        load, cores = self.metadata.get("load_average"), self.metadata.get("machine", {}).get("cores")
        if load is not None and cores and load > BUSY_LOAD * cores:
            problems.append(f"the machine was busy when profiling began (load average {load:.1f} on {cores} cores)")
        return problems

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.records)
        frame["spread"] = frame["p90_ms"] / frame["p10_ms"]
        return frame

    def describe(self) -> str:
        """The table as text: what it was made for, then block times with their spread."""
        meta, spec = self.metadata, self.spec
        machine = meta.get("machine", {})
        median, worst = self.additivity_errors()
        lines = [
            f"model {meta.get('model', '?')} ({self.shape.model_type}, {self.shape.num_layers} layers, "
            f"{self.shape.attention_units} attention units, FFN {self.shape.intermediate_size})",
            f"spec  {spec.backend} on {spec.device}, {spec.dtype}, {spec.threads} threads, batch {spec.batch_size} x "
            + (f"1 token after {spec.context} cached" if spec.mode == "decode" else f"{spec.seq_len} tokens"),
            f"on    {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
            + (f", {machine['gpu']}" if machine.get("gpu") else "") + f"; {meta.get('created', '?')}",
            f"dense {self.dense_ms:.3f} ms predicted; fixed part {self.fixed_ms:.3f} ms; max speedup {self.max_speedup:.2f}x; "
            f"estimator {self.estimator}",
            f"additivity over {len(self.additivity)} whole models: median error {median:.1%}, max {worst:.1%} "
            f"(leave-one-out, after scale {self.scale:.3f} fitted on whole models)",
            *[f"WARNING: {problem}: {TRUST_ADVICE}" for problem in self.trust_problems()],
            "",
            self.to_frame().to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        ]
        return "\n".join(lines)

    # --- validity ------------------------------------------------------------------------------

    def check_compatible(self, shape: ModelShape, spec: InferenceSpec | None = None, source: str = "table") -> None:
        """A table is only valid for its model shape and spec: anything else is an error."""
        problems = self.shape.differences(shape)
        if spec is not None:
            problems += self.spec.differences(spec)
        if problems:
            raise UserError(f"{source} was made for another model or spec ({'; '.join(problems)}): profile this one")

    # --- files ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FORMAT, "spec": self.spec.to_dict(), "shape": self.shape.__dict__, "estimator": self.estimator,
                "scale": self.scale, "metadata": self.metadata, "records": self.records, "additivity": self.additivity}

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"latency table {path} does not exist: make one with `ziplm-planner profile`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"latency table {path} is not valid JSON ({err}): re-run `ziplm-planner profile`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a ziplm-planner latency table (expected format {FORMAT!r})")
        try:
            table = cls(InferenceSpec(**data["spec"]), ModelShape(**data["shape"]), data["estimator"],
                        list(data["records"]), list(data.get("additivity", [])), dict(data.get("metadata", {})),
                        float(data.get("scale", 1.0)))
            blocks = {r["block"] for r in table.records}
            assert {ATTENTION, FFN, FIXED} <= blocks and table.estimator in ESTIMATORS
            assert all(r["time_ms"] >= 0 for r in table.records)
        except (KeyError, TypeError, AssertionError):
            raise UserError(f"latency table {path} is incomplete or corrupt: re-run `ziplm-planner profile`") from None
        return table
