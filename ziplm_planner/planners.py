"""One registry of planning methods: ZipLM beside the baselines, each a class behind one interface.

The registry is light (no torch): the CLI's choices come from it. A method's planner class is imported
when a run first asks for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from torch import nn

    from .calibrate import Calibration, CalibrationLoss
    from .models import LoadedModel
    from .settings import CompressSettings
    from .surgery import PruningPlan
    from .table import LatencyTable


class Planner(Protocol):
    """What every method is to the verify loop: a pruned model for a latency budget."""

    def build(self, budget_ms: float) -> tuple[nn.Module, PruningPlan, list[tuple[int, int]]]:
        """(pruned model, its plan, kept (attention, FFN) per layer) predicted to run in `budget_ms`."""

    def metadata(self) -> dict:
        """What the family report records of how the planner was made."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    location: str  # "module:Class" of its planner, whose `prepare` classmethod makes one

    def planner_class(self):
        module, name = self.location.split(":")
        return getattr(importlib.import_module(module, __package__), name)


ZIPLM = "ziplm"
PLANNERS = {method.name: method for method in (
    Method(ZIPLM, "structured OBS level database, DP per budget with SPDY-learned layer weights", ".ziplm:ZipLMPlanner"),
    Method("magnitude", "weight-norm structures, DP on the share of norm removed", ".baselines:MagnitudePlanner"),
    Method("uniform", "one keep ratio for every block, structures by weight norm", ".baselines:UniformPlanner"),
    Method("layerdrop", "whole layers dropped by block influence (ShortGPT)", ".baselines:LayerDropPlanner"),
    Method("kwon", "mask Fisher, rearrangement and least-squares mask tuning (Kwon et al. 2022)",
           ".baselines:KwonPlanner"),
)}
METHODS = tuple(PLANNERS)


def planner_for(loaded: LoadedModel, table: LatencyTable, calibration: Calibration, settings: CompressSettings,
                score_loss: CalibrationLoss | None = None, base: PruningPlan | None = None) -> Planner:
    """`settings.method`'s planner for `loaded.model`: the dense model, or (gradual pruning, `base` given)
    the model pruned and distilled so far, which keeps `base` of the dense one. `score_loss` scores
    candidate models where the method searches on the calibration loss."""
    return PLANNERS[settings.method].planner_class().prepare(loaded, table, calibration, settings, score_loss, base)
