"""Latency lookup tables: block times per pruned size on one machine, backend and spec.

Predicted latency of a configuration (ZipLM, Kurtic et al. 2023: a runtime lookup table per structure):
    T = scale * (fixed + sum over layers of attention(a_l) + ffn(n_l)) + offset
with attention(removed) = ffn(0) = 0 (a removed block). An attention level a is an `AttentionLevel`
(KV groups kept, query heads kept in each): its record holds the groups as `level` and the heads
per group as `heads` (tables without `heads` timed whole groups only). `scale` and `offset` are
fitted on whole models the profiler measures, from the dense one down to small ones: a block timed alone runs with its
weights hot in cache while a whole model streams all of them, and small models keep more of
themselves in cache, so the block sum is off by a factor plus a constant, not by a factor alone
(a factor alone left 3x MiniLM members 8-10% faster than predicted). The table records how far
each measured whole model was from the prediction (leave-one-out), so additivity is checked,
not assumed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .adapters import ATTENTION, FFN, REMOVED_ATTENTION, AttentionLevel, ModelShape, removed_level
from .atomic import atomic_write_text
from .errors import UserError
from .spec import InferenceSpec
from .timing import ESTIMATORS

FORMAT = "ziplm-planner/latency-table/v1"
FIXED = "fixed"
ADDITIVITY_MEDIAN, ADDITIVITY_MAX = 0.05, 0.10  # |predicted / measured - 1| of whole models a sound table keeps
WHOLE_MODEL_SPREAD = 1.5  # median p90/p10 of whole-model timings above which the machine was too noisy
BUSY_SHARE = 0.25  # share of the cores other processes used while profiling, above which timings are suspect
TRUST_ADVICE = ("profile again on a quiet machine (stop other jobs; `uptime` shows the load) "
                "or with more --rounds; speedups planned from this table may miss")


@dataclass
class LatencyTable:
    spec: InferenceSpec
    shape: ModelShape
    estimator: str
    records: list[dict]  # block, level (and heads), time_ms (the estimate), min_ms, p10_ms, median_ms, p90_ms, runs
    additivity: list[dict] = field(default_factory=list)  # whole models: kept, predicted_ms, measured_ms, error
    metadata: dict = field(default_factory=dict)  # model, machine, versions, created, settings, seconds
    scale: float = 1.0  # whole model ms = scale * block sum + offset_ms, fitted on measured whole models,
    offset_ms: float = 0.0  # for block sums from line_from_ms up; below it, proportional to the block sum
    line_from_ms: float = 0.0
    # the file it was read from or saved to (None: made in memory); how warnings and reports name it
    path: Path | None = field(default=None, compare=False)
    # (the records list it was made from, {block: (levels, times)}): searches and baselines look up
    # block times thousands of times per plan; a new records list makes it anew
    _lookup: tuple = field(default_factory=lambda: (None, {}), init=False, repr=False, compare=False)

    # --- lookups ---------------------------------------------------------------------------

    def _timed(self, block: str) -> tuple[list, list[float]]:
        if self._lookup[0] is not self.records:
            self._lookup = (self.records, {})
        by_block = self._lookup[1]
        if block not in by_block:
            pairs = sorted((record_level(r, self.shape), r["time_ms"]) for r in self.records if r["block"] == block)
            by_block[block] = ([level for level, _ in pairs], [ms for _, ms in pairs])
        return by_block[block]

    def levels(self, block: str) -> list:
        """The sizes timed: `AttentionLevel`s for attention, neuron counts for the FFN, ascending."""
        return list(self._timed(block)[0])

    def choices(self, block: str) -> list:
        """Levels a search may choose: the block removed, and every size timed."""
        return [removed_level(block), *self.levels(block)]

    def times(self, block: str) -> list[float]:
        """Estimated ms at each of `levels(block)`."""
        return list(self._timed(block)[1])

    def time(self, block: str, kept: AttentionLevel | int) -> float:
        """Block time at a level; FFN sizes between table levels interpolate linearly, attention levels
        must have been timed (an integer attention level counts whole KV groups)."""
        if kept in (0, REMOVED_ATTENTION):
            return 0.0
        if block == ATTENTION:
            if not isinstance(kept, AttentionLevel):
                kept = self.shape.whole_groups(kept)
            levels, times = self._timed(ATTENTION)
            try:
                return times[levels.index(kept)]
            except ValueError:
                raise ValueError(f"attention level {kept} was not timed in this table") from None
        return float(np.interp(kept, *self._timed(block)))

    @property
    def fixed_ms(self) -> float:
        return next(r["time_ms"] for r in self.records if r["block"] == FIXED)

    def whole_groups(self) -> list[AttentionLevel]:
        """The attention levels that keep every query head of their groups, ascending."""
        return [level for level in self.levels(ATTENTION) if level.heads == self.shape.q_per_unit]

    def block_sum(self, kept_counts: list[tuple[AttentionLevel, int]]) -> float:
        """fixed + sum of block times, unscaled: the quantity the search budgets."""
        return self.fixed_ms + sum(self.time(ATTENTION, a) + self.time(FFN, f) for a, f in kept_counts)

    def predict(self, kept_counts: list[tuple[AttentionLevel, int]]) -> float:
        """Predicted ms of a model keeping (attention level, FFN neurons) per layer."""
        return self.from_block_sum(self.block_sum(kept_counts))

    def from_block_sum(self, block_sum_ms: float) -> float:
        return self.whole_model_ms(block_sum_ms, self.scale, self.offset_ms, self.line_from_ms)

    @staticmethod
    def whole_model_ms(block_sum_ms: float, scale: float, offset_ms: float, line_from_ms: float) -> float:
        """The fitted line from `line_from_ms` up, and below it the line's value there scaled down
        proportionally (nothing below was measured, and a model's time stays positive)."""
        if block_sum_ms >= line_from_ms:
            return scale * block_sum_ms + offset_ms
        return (scale * line_from_ms + offset_ms) * block_sum_ms / line_from_ms

    def block_budget(self, total_ms: float) -> float:
        """The budget for the sum of block times (fixed part excluded) that gives a model of `total_ms`:
        the inverse of `from_block_sum`."""
        knee = self.scale * self.line_from_ms + self.offset_ms
        block_sum = (total_ms - self.offset_ms) / self.scale if total_ms >= knee else total_ms * self.line_from_ms / knee
        return block_sum - self.fixed_ms

    @property
    def dense_ms(self) -> float:
        return self.predict(self.shape.dense_kept)

    @property
    def fixed_share(self) -> float:
        """The fixed part's share of the dense model's block time: a ratio of timings taken together,
        unlike `fixed_ms`, which a machine slowed while the blocks were timed inflates (the whole-model
        fit corrects the totals, not that one record)."""
        return self.fixed_ms / self.block_sum(self.shape.dense_kept)

    def layer_speedup(self, target: float) -> float:
        """How much faster the layers' blocks must run for the whole model to reach `target`: more than
        `target`, since the fixed part (embeddings, an LM head over every position) does not shrink."""
        return self.block_budget(self.dense_ms) / self.block_budget(self.dense_ms / target)

    @property
    def max_speedup(self) -> float:
        """The speedup of the fastest model that still has a block: the fixed part plus the cheapest
        block. Past it the only plan is a model with every layer removed, which is no language model."""
        cheapest = min(min(self.times(ATTENTION)), min(self.times(FFN)))
        return self.dense_ms / self.from_block_sum(self.fixed_ms + cheapest)

    def additivity_errors(self) -> tuple[float, float]:
        """Median and max |predicted / measured - 1| over the whole models measured."""
        errors = [abs(a["error"]) for a in self.additivity]
        return (float(np.median(errors)), float(max(errors))) if errors else (float("nan"), float("nan"))

    def trust_problems(self) -> list[str]:
        """Why this table's figures may not hold, each with what to do; empty when it looks sound.
        Judged by what the profiler saw: whole models against the block sum, the spread of whole-model
        timings (short blocks always spread; whole models on a quiet machine stay within ~1.1-1.45x),
        and the CPU time other processes (or the VM host, as steal) took while it timed."""
        problems = []
        median, worst = self.additivity_errors()
        if median > ADDITIVITY_MEDIAN or worst > ADDITIVITY_MAX:
            problems.append(f"whole models differ from the block sum by {median:.1%} median, {worst:.1%} max "
                            f"(sound: <= {ADDITIVITY_MEDIAN:.0%} / {ADDITIVITY_MAX:.0%})")
        spreads = [a["measured"]["p90_ms"] / a["measured"]["p10_ms"] for a in self.additivity if "measured" in a]
        if spreads and float(np.median(spreads)) > WHOLE_MODEL_SPREAD:
            problems.append(f"whole-model timings spread {float(np.median(spreads)):.2f}x p90/p10 "
                            f"(sound: <= {WHOLE_MODEL_SPREAD})")
        others = self.metadata.get("others_cpu_share")
        if others is not None and others > BUSY_SHARE:
            problems.append(f"other work (or the VM host) used {others:.0%} of the cores while profiling "
                            f"(sound: <= {BUSY_SHARE:.0%})")
        return problems

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.records).drop(columns="heads", errors="ignore")
        frame["level"] = [str(record_level(r, self.shape)) for r in self.records]
        frame["spread"] = frame["p90_ms"] / frame["p10_ms"]
        return frame

    def describe(self) -> str:
        """The table as text: what it was made for, then block times with their spread."""
        meta, spec = self.metadata, self.spec
        machine = meta.get("machine", {})
        median, worst = self.additivity_errors()
        lines = [
            f"model {meta.get('model', '?')} ({self.shape.model_type}, {self.shape.num_layers} layers, "
            f"attention {self.shape.full_attention} (KV groups x query heads), FFN {self.shape.intermediate_size})",
            f"spec  {spec.backend} on {spec.device}, {spec.dtype}, {spec.threads} threads, batch {spec.batch_size} x "
            + (f"1 token after {spec.context} cached" if spec.mode == "decode" else f"{spec.seq_len} tokens"),
            f"on    {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
            + (f", {machine['gpu']}" if machine.get("gpu") else "") + f"; {meta.get('created', '?')}"
            + (f"; the soundest of {meta['attempts']} profiles" if meta.get("attempts", 1) > 1 else ""),
            f"dense {self.dense_ms:.3f} ms predicted; fixed part {self.fixed_ms:.3f} ms; max speedup {self.max_speedup:.2f}x; "
            f"estimator {self.estimator}",
            f"additivity over {len(self.additivity)} whole models: median error {median:.1%}, max {worst:.1%} "
            f"(leave-one-out, after scale {self.scale:.3f} and offset {self.offset_ms:+.3f} ms from block sum "
            f"{self.line_from_ms:.1f} ms, fitted on whole models)",
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
                "scale": self.scale, "offset_ms": self.offset_ms, "line_from_ms": self.line_from_ms, "metadata": self.metadata, "records": self.records, "additivity": self.additivity}

    def save(self, path: str | Path) -> Path:
        self.path = atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))
        return self.path

    @property
    def name(self) -> str:
        """The table as warnings and reports name it: its file, else the model it was profiled for."""
        return str(self.path) if self.path is not None else f"the table of {self.metadata.get('model', 'a model')}"

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read and validate a table file: every field is checked here, so that a damaged table is one
        line naming the problem, not a crash (a division by a zero fixed part) minutes later."""
        path = Path(path)
        if path.is_dir():
            raise UserError(f"latency table {path} is a directory: give the file `ziplm-planner profile -o` wrote")
        if not path.is_file():
            raise UserError(f"latency table {path} does not exist: make one with `ziplm-planner profile`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"latency table {path} is not valid JSON ({err}): re-run `ziplm-planner profile`") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{path} is not a ziplm-planner latency table (expected format {FORMAT!r})")
        try:
            return dataclasses.replace(cls.from_dict(data), path=path)
        except InvalidTable as err:
            raise UserError(f"latency table {path} is incomplete or corrupt ({err}): "
                            "re-run `ziplm-planner profile`") from None

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        """The table `to_dict` wrote, validated; InvalidTable names the first field that is wrong."""
        shape = _shape(data.get("shape"))
        return cls(_spec(data.get("spec")), shape, _estimator(data.get("estimator")), _records(data.get("records"), shape),
                   _additivity(data.get("additivity", []), shape), _mapping(data.get("metadata", {}), "metadata"),
                   _positive(data.get("scale", 1.0), "scale"), _finite(data.get("offset_ms", 0.0), "offset_ms"),
                   _line_from(data.get("line_from_ms", 0.0), data.get("scale", 1.0), data.get("offset_ms", 0.0)))


# --- validation on load: one function per rule -------------------------------------------------


class InvalidTable(ValueError):
    """A table field that is missing or wrong; `LatencyTable.load` names the file."""


TIME_FIELDS = ("time_ms", "min_ms", "p10_ms", "median_ms", "p90_ms")
ADDITIVITY_TIMES = ("block_sum_ms", "predicted_ms", "measured_ms")
ADDITIVITY_ERRORS = ("error", "unscaled_error")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidTable(f"{what} {value!r} is not a finite number")
    return float(value)


def _positive(value, what: str) -> float:
    if _finite(value, what) <= 0:
        raise InvalidTable(f"{what} {value!r} is not > 0")
    return float(value)


def _non_negative(value, what: str) -> float:
    if _finite(value, what) < 0:
        raise InvalidTable(f"{what} {value!r} is not >= 0")
    return float(value)


def _line_from(value, scale, offset) -> float:
    """Where the fitted line starts: >= 0, and the line positive there (else models below would get
    no time at all)."""
    start = _finite(value, "line_from_ms")
    if start < 0 or (start > 0 and _finite(scale, "scale") * start + _finite(offset, "offset_ms") <= 0) \
            or (start == 0 and offset != 0):
        raise InvalidTable(f"line_from_ms {value!r} does not start a line positive from there")
    return start


def _mapping(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidTable(f"{what} is missing or not an object")
    return value


def _spec(value) -> InferenceSpec:
    fields = _mapping(value, "spec")
    if bad := [name for name in ("threads", "batch_size", "seq_len", "context") if not _is_int(fields.get(name))]:
        raise InvalidTable(f"spec field {bad[0]} {fields.get(bad[0])!r} is not an integer")
    try:
        return InferenceSpec(**fields)
    except (TypeError, UserError) as err:  # unknown or missing fields, or values no spec allows
        raise InvalidTable(f"spec: {err}") from None


def _shape(value) -> ModelShape:
    fields = _mapping(value, "shape")
    names = [f.name for f in dataclasses.fields(ModelShape)]
    if sorted(fields) != sorted(names):
        raise InvalidTable(f"shape has fields {sorted(fields)}, expected {sorted(names)}")
    if not isinstance(fields["model_type"], str) or not fields["model_type"]:
        raise InvalidTable(f"shape model_type {fields['model_type']!r} is not a name")
    if bad := [name for name in names if name != "model_type" and not (_is_int(fields[name]) and fields[name] >= 1)]:
        raise InvalidTable(f"shape field {bad[0]} {fields[bad[0]]!r} is not an integer >= 1")
    return ModelShape(**fields)


def _estimator(value) -> str:
    if value not in ESTIMATORS:
        raise InvalidTable(f"estimator {value!r} is not one of {', '.join(ESTIMATORS)}")
    return value


def _records(value, shape: ModelShape) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InvalidTable("records are missing")
    for record in value:
        _check_record(record, shape)
    _check_unique_levels(value, shape)
    _check_attention_levels(value, shape)
    _check_ffn_levels(value, shape)
    _check_fixed(value)
    return value


def record_level(record: dict, shape: ModelShape) -> AttentionLevel | int:
    """A record's level: (groups, heads per group) for attention, structures kept otherwise."""
    if record["block"] == ATTENTION:
        return AttentionLevel(record["level"], record.get("heads", shape.q_per_unit))
    return record["level"]


def _check_record(record, shape: ModelShape) -> None:
    """block, level (and heads), the estimate and the quantiles (finite, > 0) and the number of runs."""
    if not isinstance(record, dict) or record.get("block") not in (ATTENTION, FFN, FIXED) \
            or not _is_int(record.get("level")):
        raise InvalidTable(f"record {record!r:.80} has no known block or no integer level")
    if "heads" in record and not (record["block"] == ATTENTION and _is_int(record["heads"])
                                  and 1 <= record["heads"] <= shape.q_per_unit):
        raise InvalidTable(f"record {record!r:.80}: heads must be an attention record's query heads per KV group, "
                           f"1..{shape.q_per_unit}")
    where = f"record {record['block']} level {record_level(record, shape)}:"
    for name in TIME_FIELDS:  # a block stacked in whole models may measure as free (profiler.per_layer_stats)
        (_positive if record["block"] == FIXED else _non_negative)(record.get(name), f"{where} {name}")
    if not (_is_int(record.get("runs")) and record["runs"] >= 1):
        raise InvalidTable(f"{where} runs {record.get('runs')!r} is not an integer >= 1")


def _check_unique_levels(records: list[dict], shape: ModelShape) -> None:
    counts = Counter((r["block"], record_level(r, shape)) for r in records)
    if duplicate := next((key for key, count in counts.items() if count > 1), None):
        raise InvalidTable(f"{duplicate[0]} level {duplicate[1]} is recorded more than once")


def _levels(records: list[dict], block: str) -> set[int]:
    return {r["level"] for r in records if r["block"] == block}


def _check_attention_levels(records: list[dict], shape: ModelShape) -> None:
    """Every count of whole KV groups, 1..units, is timed (the search and every baseline may choose
    any of them); query heads within groups, where timed, for at most every group."""
    levels = {record_level(r, shape) for r in records if r["block"] == ATTENTION}
    wanted = {shape.whole_groups(g) for g in range(1, shape.attention_units + 1)}
    if missing := sorted(wanted - levels):
        raise InvalidTable(f"attention levels missing {', '.join(map(str, missing))} (KV groups x query heads)")
    if outside := sorted(level for level in levels if not 1 <= level.groups <= shape.attention_units):
        raise InvalidTable(f"attention levels {', '.join(map(str, outside))} are outside 1..{shape.attention_units} groups")


def _check_ffn_levels(records: list[dict], shape: ModelShape) -> None:
    """FFN sizes within 1..intermediate_size, the dense size included (the dense prediction needs it)."""
    levels = _levels(records, FFN)
    if outside := sorted(level for level in levels if not 1 <= level <= shape.intermediate_size):
        raise InvalidTable(f"FFN levels {outside} are outside 1..{shape.intermediate_size}")
    if shape.intermediate_size not in levels:
        raise InvalidTable(f"FFN level {shape.intermediate_size} (dense) is missing")


def _check_fixed(records: list[dict]) -> None:
    """One fixed part, at level 0; its time (> 0, checked per record) divides every max-speedup."""
    if _levels(records, FIXED) != {0}:
        raise InvalidTable(f"fixed part levels {sorted(_levels(records, FIXED))} are not [0]")


def _additivity(value, shape: ModelShape) -> list[dict]:
    if not isinstance(value, list):
        raise InvalidTable("additivity is not a list")
    for n, entry in enumerate(value):
        _check_additivity_entry(_mapping(entry, f"additivity entry {n}"), shape, f"additivity entry {n}")
    return [{**entry, "kept": [(_attention_level(a, shape), f) for a, f in entry["kept"]]} for entry in value]


def _check_additivity_entry(entry: dict, shape: ModelShape, where: str) -> None:
    """One whole model: kept (attention, FFN) per layer within the shape, its times and errors.
    Attention is [groups, heads per group], or in tables that timed whole groups only, groups."""
    kept = entry.get("kept")
    if not (isinstance(kept, list) and len(kept) == shape.num_layers and all(_is_kept_pair(k, shape) for k in kept)):
        raise InvalidTable(f"{where}: kept is not {shape.num_layers} (attention, FFN) pairs within the shape")
    for name in ADDITIVITY_TIMES:
        _positive(entry.get(name), f"{where}: {name}")
    for name in ADDITIVITY_ERRORS:
        _finite(entry.get(name), f"{where}: {name}")
    _mapping(entry.get("measured"), f"{where}: measured")


def _is_kept_pair(pair, shape: ModelShape) -> bool:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_int(pair[1])):
        return False
    attention = pair[0] if isinstance(pair[0], (list, tuple)) else [pair[0]]
    return (1 <= len(attention) <= 2 and all(map(_is_int, attention)) and 0 <= attention[0] <= shape.attention_units
            and 0 <= attention[-1] <= (shape.q_per_unit if len(attention) == 2 else shape.attention_units)
            and 0 <= pair[1] <= shape.intermediate_size)


def _attention_level(value, shape: ModelShape) -> AttentionLevel:
    return AttentionLevel(*value) if isinstance(value, (list, tuple)) else shape.whole_groups(value)
