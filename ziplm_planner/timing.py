"""Timing like a benchmark harness: warm up, interleave candidates, repeat, keep the spread.

On a noisy shared machine noise only ever adds time, so a low quantile of many short
interleaved runs is the stable estimate of a candidate's cost (docs/BENCHMARKS.md, "Profiler");
the median is kept beside it because a user on a busy server lives with the median.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

from .progress import bar

ESTIMATOR_QUANTILES = {"min": 0.0, "p10": 0.1, "median": 0.5}  # each estimator is a quantile of the samples
ESTIMATORS = tuple(ESTIMATOR_QUANTILES)
DEFAULT_ESTIMATOR = "p10"


@dataclass(frozen=True)
class TimingStats:
    """Milliseconds per call over `runs` interleaved repetitions."""

    min_ms: float
    p10_ms: float
    median_ms: float
    p90_ms: float
    runs: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> TimingStats:
        deciles = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
        return cls(min(samples_ms), deciles[0], statistics.median(samples_ms), deciles[-1], len(samples_ms))

    def estimate(self, estimator: str = DEFAULT_ESTIMATOR) -> float:
        return {"min": self.min_ms, "p10": self.p10_ms, "median": self.median_ms}[estimator]

    @property
    def spread(self) -> float:
        """p90 / p10: 1.0 on a quiet machine."""
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def time_interleaved(candidates: Mapping[str, Callable[[], object]], rounds: int, *args, **kwargs) -> dict[str, TimingStats]:
    """`interleaved_samples` (same arguments), summarised per candidate."""
    samples = interleaved_samples(candidates, rounds, *args, **kwargs)
    return {name: TimingStats.from_samples(values) for name, values in samples.items()}


def speedup_interval(reference_ms: list[float], candidate_ms: list[float], estimator: str = DEFAULT_ESTIMATOR,
                     confidence: float = 0.9, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of estimate(reference) / estimate(candidate) over paired rounds: both were
    timed in the same rounds, so a round that a burst of load slowed is resampled as a pair."""
    import numpy as np

    if len(reference_ms) != len(candidate_ms) or len(reference_ms) < 2:
        raise ValueError("need paired samples from the same rounds, at least two")
    rng = np.random.default_rng(seed)
    reference, candidate = np.asarray(reference_ms), np.asarray(candidate_ms)
    picks = rng.integers(0, len(reference), size=(resamples, len(reference)))
    quantile = ESTIMATOR_QUANTILES[estimator]
    ratios = np.quantile(reference[picks], quantile, axis=1) / np.quantile(candidate[picks], quantile, axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return float(low), float(high)


def interleaved_samples(
    candidates: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 3,
    seed: int = 0,
    synchronize: Callable[[], None] | None = None,
    description: str | None = None,
) -> dict[str, list[float]]:
    """Milliseconds of every candidate in every round: each candidate runs once per round, in a new
    random order each round, after `warmup` runs."""
    sync = synchronize or (lambda: None)
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(seed)
    for _ in bar(range(rounds), desc=description or "timing", leave=False, disable=description is None):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            candidates[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples
