"""The road of one family member: plan -> verify -> recover -> save.

A member an earlier run of the same family saved is reused as it is. Otherwise it is cut from its
parent (the dense model, or in gradual recovery the last member), through intermediate prune steps
where asked, then verified by measurement and re-planned while it misses its band (verify.py), trained
and re-timed (the recovery step, a null step when there is none), pruned on where that re-timing fell
below the band, and saved into the family folder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from .calibrate import Calibration, CalibrationLoss
from .familydir import FamilyDir, Member
from .models import LoadedModel
from .planners import Planner, planner_for
from .progress import stage
from .recovery import NoRecovery, Recovery
from .settings import CompressSettings
from .surgery import PruningPlan, count_parameters
from .table import LatencyTable
from .family import member_name
from .verify import SPEEDUP_TOLERANCE, MemberResult, Unverified, Verifier, discard_export, verified_member

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parent:
    """What the next member is cut from: the dense model (no plan), or the last member of a gradual run."""

    speedup: float
    plan: PruningPlan | None = None
    model: object = None  # None: the dense model


def intermediate_speedups(start: float, target: float, steps: int) -> list[float]:
    """Where a gradual run prunes to on its way from the speedup `start` to `target` in `steps` steps, the
    target itself excluded: evenly spaced in log speedup, so every step takes a like share of the runtime."""
    return [start * (target / start) ** (step / steps) for step in range(1, steps)]


@dataclass
class MemberRoad:
    """Everything a member's steps share in one run."""

    loaded: LoadedModel
    table: LatencyTable
    calibration: Calibration
    settings: CompressSettings
    score_loss: CalibrationLoss
    dense_planner: Planner
    verifier: Verifier | Unverified
    recovery: Recovery | NoRecovery
    family: FamilyDir

    def dense(self) -> Member:
        """The dense reference: timed first, the check that the machine is the table's, whether or not it
        is then reused from a complete dense/ of this family; else saved."""
        loss, measurement = self.score_loss(self.loaded.model), self.verifier.measure_dense()
        if member := self.family.finished(1.0, calibration_loss=loss):
            return member
        result = MemberResult(1.0, member_name(1.0), PruningPlan.dense(self.table.shape), self.table.dense_ms,
                              measurement, loss, count_parameters(self.loaded.model))
        member = Member(result, self.loaded.model)
        self.family.save(member)
        return member

    def make(self, target: float, parent: Parent) -> Member:
        """The member for `target`: plan, verify, recover, save."""
        if member := self.family.finished(target, load=self.settings.recovery.nested):
            self.recovery.reused(member)
            return member
        member = self.recovery.held(self.family, target, parent.plan) or self.cut(target, parent)
        member = self.back_in_band(self.recovery.recover(member, self.verifier, self.score_loss))
        self.family.save(member)
        self.recovery.finished(member)
        return member

    def cut(self, target: float, parent: Parent) -> Member:
        """Prune `parent` toward `target` through the intermediate speedups (each step distilled, and the
        next planned on it), then verify the member, re-planned while it measures outside its band; it is
        held where recovery asks for it."""
        planner, steps = self.planner_on(parent), []
        for speedup in intermediate_speedups(parent.speedup, target, self.settings.recovery.prune_steps):
            model, plan, counts = planner.build(self.table.dense_ms / speedup)
            predicted = self.table.dense_ms / self.table.predict(counts)
            steps.append(self.recovery.intermediate(model, plan, f"{member_name(target)}-step{len(steps) + 1}",
                                                    speedup, predicted))
            planner = self.planner_on(Parent(speedup, plan, model))
        result, model = verified_member(planner, target, self.table, self.verifier, self.score_loss,
                                        self.settings.max_replans)
        member = Member(result, model, parent.plan, tuple(steps))
        self.recovery.hold(self.family, member)
        return member

    def back_in_band(self, member: Member) -> Member:
        """A trained member whose re-timing fell below its band is pruned on from its trained weights, by
        the same verified re-planning, untrained. Training changes weights, not shapes, and files are timed
        in a fresh process (isolated.py), but a ratio still moves by a few per cent within an hour on a
        shared VM, and the plan that met the band may sit at its edge: such a member shipped `missed`."""
        result = member.result
        if result.recovery is None or result.fast_enough:
            return member
        with stage(f"back in band {result.folder}", f"it re-timed at {result.speedup:.3f}x after training, below "
                                                    f"{SPEEDUP_TOLERANCE:g} x {result.target:g}: pruning on") as step:
            planner = self.planner_on(Parent(result.target, result.plan, member.model))
            pruned, model = verified_member(planner, result.target, self.table, self.verifier, self.score_loss,
                                            self.settings.max_replans)
            step.outcome = pruned.outcome()
        discard_export(result)
        recovery = {**result.recovery, "speedup_after_training": round(result.speedup, 4),
                    "calibration_loss_after_training": result.calibration_loss}
        return dataclasses.replace(member, result=dataclasses.replace(pruned, recovery=recovery), model=model)

    def planner_on(self, parent: Parent) -> Planner:
        """The method's planner on `parent`: the dense model's, made once, or one made on a pruned model
        (gradual: for ZipLM its level database recomputed, for magnitude GMP*)."""
        if parent.model is None:
            return self.dense_planner
        return planner_for(dataclasses.replace(self.loaded, model=parent.model), self.table, self.calibration,
                           self.settings, self.score_loss, base=parent.plan)

    def next_parent(self, member: Member, dense: Parent) -> Parent:
        """Gradual: the next member is cut from this one; else from the dense model."""
        if not self.settings.recovery.nested:
            return dense
        return Parent(member.result.target, member.result.plan, member.model)
