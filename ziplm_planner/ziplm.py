"""The ZipLM planner: per budget, the DP over the level database with SPDY-learned layer weights,
stitched with the OBS-updated weights of every chosen level."""

from __future__ import annotations

import logging
import time

from .calibrate import Calibration, CalibrationLoss
from .database import LevelDatabase, build_database, cached_database, database_key
from .familydir import model_fingerprint
from .models import LoadedModel
from .progress import bar, stage
from .search import spdy_search, total_time
from .settings import CORRECTED, FISHER, SEQUENTIAL, CompressSettings
from .stitch import stitch, stitch_sequential
from .surgery import PruningPlan, count_parameters
from .table import LatencyTable

log = logging.getLogger(__name__)


class ZipLMPlanner:
    """ZipLM: the SPDY-searched DP over the level database, stitched with OBS-updated weights."""

    def __init__(self, loaded: LoadedModel, table: LatencyTable, db: LevelDatabase, calibration: Calibration,
                 settings: CompressSettings, score_loss: CalibrationLoss, seconds: float = 0.0):
        self.loaded, self.table, self.db, self.calibration, self.settings = loaded, table, db, calibration, settings
        self.problem = db.search_blocks(table)
        self.score_loss = score_loss
        self.seconds = seconds

    @classmethod
    def prepare(cls, loaded: LoadedModel, table: LatencyTable, calibration: Calibration, settings: CompressSettings,
                score_loss: CalibrationLoss, base: PruningPlan | None = None) -> ZipLMPlanner:
        """The planner on the level database of `loaded.model`: the dense model's from the cache (or built
        and cached), or for a model already pruned (`base`), Hessians and OBS recomputed on it."""
        started = time.perf_counter()
        kind = loaded.kind if settings.block_errors == FISHER else None  # None: relative errors, no Fisher

        def build() -> LevelDatabase:
            return build_database(loaded.model, calibration, table, settings.dampening, base=base, kind=kind)

        if base is not None:
            with stage("level database", f"of the current model ({count_parameters(loaded.model):,} parameters)"):
                db = build()
        else:
            key = database_key(model_fingerprint(loaded), calibration, table, settings.dampening, settings.num_samples,
                               settings.seed, settings.block_errors)
            with stage("level database", f"{table.shape.num_layers} layers, {calibration.num_samples} samples") as step:
                db = cached_database(settings.cache_dir, key, build)
                step.outcome = "from the cache" if db.metadata.get("cached") else f"cached in {settings.cache_dir}"
        return cls(loaded, table, db, calibration, settings, score_loss, time.perf_counter() - started)

    def metadata(self) -> dict:
        return {"level_database": {**self.db.metadata, "seconds_this_run": round(self.seconds, 2)}}

    def search(self, budget_ms: float) -> list[tuple[int, int]]:
        """Kept (attention, FFN) per layer minimising the learned-weighted error within `budget_ms`."""
        block_budget = self.table.block_budget(budget_ms)

        def score(choice: list[int]) -> float:
            model, _ = stitch(self.loaded.model, self.db, self.db.kept_counts(self.problem, choice))
            return self.score_loss(model)

        with bar(total=self.settings.search_evaluations, desc=f"search {budget_ms:.1f} ms", leave=False) as shown:
            result = spdy_search(self.problem, block_budget, score, evaluations=self.settings.search_evaluations,
                                 seed=self.settings.seed, progress=lambda n, best: shown.update(n - shown.n))
        log.info("budget %.2f ms: blocks %.2f ms, score %.5f after %d evaluations", budget_ms,
                 total_time(self.problem, result.choice), result.score, result.evaluations)
        return self.db.kept_counts(self.problem, result.choice)

    def build(self, budget_ms: float):
        """(pruned model, plan, kept counts) for a model predicted to run in `budget_ms`."""
        counts = self.search(budget_ms)
        if self.settings.calibration_inputs == SEQUENTIAL:
            return (*stitch_sequential(self.loaded.model, self.db, counts, self.calibration), counts)
        correction = self.calibration if self.settings.calibration_inputs == CORRECTED else None
        return (*stitch(self.loaded.model, self.db, counts, correction), counts)
