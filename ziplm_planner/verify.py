"""Verify by measurement: time each member as it ships against the dense model, and re-plan the
ones that miss their target or overshoot it.

A single timing on a busy machine lies, and only ever upward. So a member is timed interleaved with the
dense model, a bootstrap interval is kept beside the speedup, and a result outside the accepted band is
confirmed with more rounds before anything is re-planned. Among members that meet a target, the one
closest to it is kept.

Re-planning corrects the table's small errors, never a machine the table does not describe: timings
taken while other work loads the cores, or on another machine, would walk a member far past its target
(a busy run once shipped an x2 with every attention block removed). So every timing's dense model is
compared with the table's prediction first; while they disagree the verifier waits and measures again,
and if they still do it stops with one line. A re-plan also never moves the budget further than
REPLAN_REACH from the first plan's.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import backend_for
from .calibrate import CalibrationLoss
from .environment import CpuSnapshot, others_share
from .errors import UserError
from .family import member_name
from .isolated import isolated_samples
from .models import LoadedModel
from .profiler import fixed_part, workload
from .progress import note
from .settings import CompressSettings
from .surgery import PruningPlan, count_parameters
from .table import BUSY_SHARE, LatencyTable
from .timing import TimingStats, interleaved_samples, speedup_interval

if TYPE_CHECKING:
    from .planners import Planner

log = logging.getLogger(__name__)

SPEEDUP_TOLERANCE = 0.97  # a member below 0.97 x target has missed it: re-planned with a tighter budget
OVERSHOOT = 1.10  # one above 1.10 x target left accuracy on the table: re-planned with a looser budget
CONFIRM_FACTOR = 2  # a result outside the band is re-measured with this many times the rounds, pooled
REPLAN_REACH = 1.5  # a re-plan's budget stays within this factor of the first plan's: beyond it the table is wrong
SETTLE_WAITS = (15.0, 45.0)  # seconds waited before each new timing of a machine that disagrees with its table
UNVERIFIED = "unverified"  # the status of a member shipped as planned (--no-verify)


class MachineDisagrees(UserError):
    """The machine, as measured while verifying, is not the one the table describes."""


def off_by(measured: float, predicted: float) -> float:
    """How many times one is the other (>= 1)."""
    return max(measured / predicted, predicted / measured)


@dataclass(frozen=True)
class MachineCheck:
    """One timing's dense model (and, once per run, its fixed part) against the table's figures, and
    the share of the cores other processes used meanwhile (None where the OS does not say)."""

    dense_ms: float
    table_dense_ms: float
    others: float | None
    fixed_ms: float | None = None
    table_fixed_ms: float | None = None

    def problems(self, tolerance: float) -> list[str]:
        """What disagrees, each as a phrase; none when the machine measures as its table describes."""
        found = [f"{what} measured {measured:.4g} ms against the table's {predicted:.4g} ms"
                 for what, measured, predicted in (("the dense model", self.dense_ms, self.table_dense_ms),
                                                   ("the fixed part", self.fixed_ms, self.table_fixed_ms))
                 if measured is not None and off_by(measured, predicted) > tolerance]
        if self.others is not None and self.others > BUSY_SHARE:
            found.append(f"other processes used {self.others:.0%} of the cores (sound: <= {BUSY_SHARE:.0%})")
        return found


def verdict(speedup: float, target: float) -> str:
    """met (inside [0.97, 1.10] x target), missed (slower) or overshot (faster: accuracy lost)."""
    if target == 1 or SPEEDUP_TOLERANCE * target <= speedup <= OVERSHOOT * target:
        return "met"
    return "missed" if speedup < SPEEDUP_TOLERANCE * target else "overshot"


@dataclass
class Measurement:
    """A model timed against the dense model in the same interleaved rounds."""

    member: TimingStats
    dense: TimingStats
    estimator: str
    interval: tuple[float, float]  # bootstrap 90% interval of the speedup
    rounds: int
    remeasured: bool  # confirmed with more rounds: the first timing fell outside the band
    timed: str  # what was run, as the backend names it ("model.onnx", "model.gguf", "torch module")
    timed_file: Path | None = None  # the file timed (model.onnx, model.gguf); it ships with the member

    @property
    def speedup(self) -> float:
        return self.dense.estimate(self.estimator) / self.member.estimate(self.estimator)

    def to_dict(self) -> dict:
        return {"member": self.member.to_dict(), "dense": self.dense.to_dict(), "estimator": self.estimator,
                "interval": list(self.interval), "rounds": self.rounds, "remeasured": self.remeasured}

    @classmethod
    def from_dict(cls, data: dict, timed: str) -> Measurement:
        """The measurement `to_dict` wrote, of a member timed as `timed` (its family's backend says)."""
        return cls(TimingStats(**data["member"]), TimingStats(**data["dense"]), data["estimator"],
                   tuple(data["interval"]), data["rounds"], data["remeasured"], timed)

    def describe(self) -> str:
        how = f"re-measured, {self.rounds} rounds in all" if self.remeasured else f"{self.rounds} rounds"
        return f"{self.speedup:.3f}x (90% interval {self.interval[0]:.3f}-{self.interval[1]:.3f}, {how})"


class Verifier:
    """Times models as they are deployed (their shipped model.onnx or model.gguf, loaded into a process
    of their own) against the dense one, interleaved, on the table's backend and spec, and only while
    the machine measures as the table describes: `tolerance` times the table's own worst additivity
    error, and other processes within the profiler's limit."""

    def __init__(self, loaded: LoadedModel, table: LatencyTable, rounds: int, workdir: Path, tolerance: float,
                 seed: int = 0):
        self.table, self.rounds, self.workdir, self.seed = table, rounds, workdir, seed
        self.tolerance = tolerance * (1 + table.additivity_errors()[1])
        self.work, self.backend = workload(loaded, table.spec, seed), backend_for(table.spec)
        self.dense, self.dense_file = self._candidate(loaded.model, "dense")
        self.fixed = self._candidate(fixed_part(loaded.model), "fixed")[0]
        self.count = 0

    def measure_dense(self) -> Measurement:
        """The dense model timed with its fixed part: the check, before any member, that this machine is
        the one the table describes."""
        samples = self._settled({"dense": self.dense, "fixed": self.fixed}, self.rounds, warmup=3)
        stats = TimingStats.from_samples(samples["dense"])
        return Measurement(stats, stats, self.table.estimator, (1.0, 1.0), self.rounds, False,
                           self.backend.timed, self.dense_file)

    def measure(self, model, target: float) -> Measurement:
        """Time `model` against the dense model; outside the accepted band, confirm with more rounds."""
        self.count += 1
        member, timed_file = self._candidate(model, f"m{self.count}")
        candidates = {"dense": self.dense, "member": member}
        samples = self._settled(candidates, self.rounds, warmup=3)
        measurement = self._summary(samples, False, timed_file)
        if verdict(measurement.speedup, target) != "met":
            more = self._settled(candidates, CONFIRM_FACTOR * self.rounds, warmup=0)
            measurement = self._summary({k: samples[k] + more[k] for k in samples}, True, timed_file)
        return measurement

    def _settled(self, candidates: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
        """Timings taken while the machine measures as its table describes. While it does not, nothing is
        re-planned on them: wait and time again; if it still does not, stop the run."""
        waits = iter(SETTLE_WAITS)
        while True:
            before = CpuSnapshot.now(with_children=True)  # the timing process is this run's
            samples = self._samples(candidates, rounds, warmup)
            problems = self.machine_check(samples, others_share(before, CpuSnapshot.now(with_children=True))).problems(self.tolerance)
            if not problems:
                return samples
            if (wait := next(waits, None)) is None:
                raise MachineDisagrees(
                    f"verification stopped: {'; '.join(problems)}, still after waiting {sum(SETTLE_WAITS):g} s: "
                    f"{self.table.name} does not describe this machine as it is now. Profile this machine "
                    "(ziplm-planner profile), run when it is quiet, or pass --no-verify to ship the planned members "
                    "unverified (--machine-tolerance sets how far the dense model may be from the table)")
            note(f"{'; '.join(problems)}: not re-planning on these timings; waiting {wait:g} s to time again")
            time.sleep(wait)

    def machine_check(self, samples: dict[str, list[float]], others: float | None) -> MachineCheck:
        def measured(name: str) -> float | None:
            return TimingStats.from_samples(samples[name]).estimate(self.table.estimator) if name in samples else None
        return MachineCheck(measured("dense"), self.table.dense_ms, others, measured("fixed"), self.table.fixed_ms)

    def _candidate(self, model, name: str) -> tuple:
        """What is timed of `model`, and the file that ships: the backend's file, timed in a process of
        its own (`isolated`), or for torch the module, run here."""
        if self.backend.file is None:
            return self.backend.module_runner(model, self.work, self.table.spec, self.workdir, name), None
        path = self.backend.file(model, self.work, self.table.spec, self.workdir, name)
        return path, path

    def _samples(self, candidates: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
        # a new order for every measurement: a fixed one would put the same candidate first after each pause
        seed = self.seed + 7919 * self.count
        if self.backend.file is None:
            return interleaved_samples(candidates, rounds, warmup, seed, self.backend.synchronizer(self.table.spec))
        return isolated_samples(candidates, self.work, self.table.spec, rounds, warmup, seed)

    def _summary(self, samples: dict[str, list[float]], remeasured: bool, timed_file: Path | None) -> Measurement:
        interval = speedup_interval(samples["dense"], samples["member"], self.table.estimator, seed=self.seed)
        return Measurement(TimingStats.from_samples(samples["member"]), TimingStats.from_samples(samples["dense"]),
                           self.table.estimator, interval, len(samples["member"]), remeasured,
                           self.backend.timed, timed_file)


class Unverified:
    """--no-verify: nothing is timed; members ship as planned, marked unverified."""

    def measure_dense(self) -> None:
        return None

    def measure(self, model, target: float) -> None:
        return None


def verifier_for(loaded: LoadedModel, table: LatencyTable, settings: CompressSettings, workdir: Path) -> Verifier | Unverified:
    if not settings.verify:
        return Unverified()
    return Verifier(loaded, table, settings.verify_rounds, workdir, settings.machine_tolerance, settings.seed)


TIMING_COLUMNS = ("measured_ms", "measured_speedup", "speedup_interval", "measured_median_ms", "measured_p10_ms",
                  "measured_p90_ms", "dense_ms", "dense_median_ms", "speedup_median", "verify_rounds", "remeasured",
                  "confirmation", "timed_file")


@dataclass
class MemberResult:
    target: float
    folder: str
    plan: PruningPlan
    predicted_ms: float
    measurement: Measurement | None  # None: shipped as planned, unverified (--no-verify)
    calibration_loss: float
    parameters: int
    replans: int = 0
    history: list[float] = field(default_factory=list)  # measured speedup of every plan tried
    predicted_history: list[float] = field(default_factory=list)  # the table's prediction for each of them
    recovery: dict | None = None  # distillation after pruning (recovery.py): steps, tokens, loss terms, curve

    @property
    def speedup(self) -> float | None:
        return None if self.measurement is None else self.measurement.speedup

    @property
    def status(self) -> str:
        return UNVERIFIED if self.measurement is None else verdict(self.speedup, self.target)

    @property
    def timed_file(self) -> Path | None:
        """The file timed (`timed`), which ships with the member; None where nothing was exported to time."""
        return None if self.measurement is None else self.measurement.timed_file

    def outcome(self) -> str:
        return self.status if self.measurement is None else f"measured {self.speedup:.2f}x, {self.status}"

    @property
    def met(self) -> bool:
        return self.status == "met"

    @property
    def fast_enough(self) -> bool:
        return self.status != "missed"

    def row(self, dense_predicted_ms: float) -> dict:
        counts = self.plan.kept_counts()
        return {
            "target": self.target, "folder": self.folder, "met_target": self.met, "status": self.status,
            "predicted_ms": round(self.predicted_ms, 4), "predicted_speedup": round(dense_predicted_ms / self.predicted_ms, 4),
            **self.timing_columns(),
            "parameters": self.parameters, "calibration_loss": self.calibration_loss, "replans": self.replans,
            "speedups_tried": [round(s, 4) for s in self.history],
            "predicted_speedups_tried": [round(s, 4) for s in self.predicted_history],
            "kept_attention": [a.query_heads for a, _ in counts], "kept_kv_groups": [a.groups for a, _ in counts],
            "kept_ffn": [f for _, f in counts],
            **self.recovery_columns(),
        }

    def timing_columns(self) -> dict:
        """The report's measured columns; None each for a member shipped unverified."""
        m = self.measurement
        if m is None:
            return dict.fromkeys(TIMING_COLUMNS)
        est = m.estimator
        return {
            "measured_ms": round(m.member.estimate(est), 4), "measured_speedup": round(self.speedup, 4),
            "speedup_interval": [round(v, 4) for v in m.interval],
            "measured_median_ms": round(m.member.median_ms, 4), "measured_p10_ms": round(m.member.p10_ms, 4),
            "measured_p90_ms": round(m.member.p90_ms, 4), "dense_ms": round(m.dense.estimate(est), 4),
            "dense_median_ms": round(m.dense.median_ms, 4),
            "speedup_median": round(m.dense.median_ms / m.member.median_ms, 4),
            "verify_rounds": m.rounds, "remeasured": m.remeasured, "confirmation": m.describe(),
            "timed_file": m.timed,
        }

    def recovery_columns(self) -> dict:
        """The report's recovery columns (the loss curve stays in the member's measurement.json)."""
        if self.recovery is None:
            return {"recovery": "none"}
        r = self.recovery
        return {"recovery": r["mode"], "prune_steps": len(r.get("prune_steps", ())) or 1,
                "train_steps": r["steps"], "train_tokens": r["tokens"],
                "train_seconds": round(r["seconds"], 1), "train_tokens_per_second": r["tokens_per_second"],
                "calibration_loss_before_recovery": r["calibration_loss_before"],
                # as verified before training (None: unverified); `measured_speedup` is the trained member's
                "speedup_before_training": r.get("speedup_before_training"),
                # set where the trained member re-timed below its band and was pruned on (member.back_in_band)
                "speedup_after_training": r.get("speedup_after_training"),
                **{f"train_final_{name}": round(value, 6) for name, value in r["final"].items()}}


def next_budget(budget: float, speedup: float, target: float, fast: list[float], slow: list[float],
                bounds: tuple[float, float]) -> float:
    """The budget to try next: scaled by the measured shortfall or excess, but kept strictly between
    the largest budget that met the target and the smallest that missed it (geometric midpoint when
    the scaled guess falls outside), so a miss followed by an overshoot never walks past either; and
    within `bounds`."""
    guess = budget * speedup / target * (1.0 if speedup >= SPEEDUP_TOLERANCE * target else 0.99)
    low, high = max(fast, default=None), min(slow, default=None)
    if low is not None and high is not None and not low < guess < high:
        guess = math.sqrt(low * high)
    return min(bounds[1], max(bounds[0], guess))


def replan_bounds(table: LatencyTable, target: float) -> tuple[float, float]:
    """How far re-plans may move a member's budget: within REPLAN_REACH of the first plan's, which the
    table predicts meets the target. Timings that ask for more are not noise the re-plan corrects
    but a table that does not describe the machine; never below the fastest model with a block left."""
    first = table.dense_ms / target
    return max(first / REPLAN_REACH, table.dense_ms / table.max_speedup), first * REPLAN_REACH


def keeps_over(result: MemberResult, other: MemberResult | None) -> bool:
    """Of two tries for a target, whether to keep `result` over `other`: one fast enough over one that
    is not; of two fast enough, the slower (closest to the target: the most accuracy); of two too
    slow, the faster. A tie keeps the earlier."""
    if other is None:
        return True
    if result.fast_enough != other.fast_enough:
        return result.fast_enough
    return result.speedup < other.speedup if result.fast_enough else result.speedup > other.speedup


def discard_export(result: MemberResult | None) -> None:
    if result is not None and result.timed_file is not None:
        result.timed_file.unlink(missing_ok=True)


def verified_member(planner: Planner, target: float, table: LatencyTable, verifier: Verifier | Unverified,
                    score_loss: CalibrationLoss, max_replans: int) -> tuple[MemberResult, object]:
    """Plan with any planner, build and measure, re-plan until the measured speedup is inside
    [0.97, 1.10] x target, `max_replans` are spent or the budget reaches its bounds (`replan_bounds`).
    Keeps the member closest above 0.97 x target; if none got there, the fastest one, reported as
    missed. Only the member kept so far stays in memory. Unverified, the first plan ships."""
    budget, bounds = table.dense_ms / target, replan_bounds(table, target)
    fast, slow, speedups, predicted = [], [], [], []
    best, best_model = None, None
    for attempt in range(max_replans + 1):
        model, plan, counts = planner.build(budget)
        measurement = verifier.measure(model, target)
        result = MemberResult(target, member_name(target), plan, table.predict(counts), measurement,
                              score_loss(model), count_parameters(model), attempt)
        if measurement is None:
            return result, model
        speedups.append(result.speedup)
        predicted.append(table.dense_ms / result.predicted_ms)
        (fast if result.fast_enough else slow).append(budget)
        log.info("x%g plan %d: predicted %.3fx, measured %s", target, attempt, predicted[-1], measurement.describe())
        if keeps_over(result, best):
            discard_export(best)  # a candidate's export is not kept
            best, best_model = result, model
        else:
            discard_export(result)
        del model
        if result.met:
            break
        budget, tried = next_budget(budget, result.speedup, target, fast, slow, bounds), budget
        if budget == tried:
            log.warning("x%g: a re-plan would move the budget more than %gx from the first plan's: the table does "
                        "not describe this machine's relative costs (profile it again)", target, REPLAN_REACH)
            break
    best.replans, best.history, best.predicted_history = len(speedups) - 1, speedups, predicted
    if not best.met:
        log.warning("x%g: %s after %d re-plans: %s", target, best.status, best.replans, best.measurement.describe())
    return best, best_model
