"""Choose one level per block under a latency budget: the DP and the SPDY search.

Pure numpy so it can be checked against exhaustive enumeration. The DP solves
min Σ_b c_b · err_b(level_b) s.t. Σ_b time_b(level_b) <= budget (ZipLM §3.3, SPDY §3);
the SPDY search learns the coefficients c from the caller's calibration loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockLevels:
    """The options for one block: structures kept, measured time (ms), relative error."""

    name: str
    levels: tuple[int, ...]
    times: tuple[float, ...]
    errors: tuple[float, ...]

    def __post_init__(self):
        if not self.levels or not len(self.levels) == len(self.times) == len(self.errors):
            raise ValueError(f"{self.name}: levels, times and errors need the same non-zero length")
        if min(self.times) < 0 or min(self.errors) < 0:
            raise ValueError(f"{self.name}: times and errors must be >= 0")


class InfeasibleBudget(ValueError):
    """The budget is below the fastest possible choice."""


def minimum_time(blocks: Sequence[BlockLevels]) -> float:
    """The total time with every block at its fastest level."""
    return float(sum(min(b.times) for b in blocks))


def total_time(blocks: Sequence[BlockLevels], choice: Sequence[int]) -> float:
    """Σ_b time_b(choice_b), in ms."""
    return float(sum(b.times[i] for b, i in zip(blocks, choice, strict=True)))


def total_error(blocks: Sequence[BlockLevels], choice: Sequence[int],
                coefficients: Sequence[float] | None = None) -> float:
    """Σ_b c_b · err_b(choice_b); c defaults to all ones."""
    c = _coefficients(blocks, coefficients)
    return float(sum(cb * b.errors[i] for cb, b, i in zip(c, blocks, choice, strict=True)))


def _coefficients(blocks, coefficients) -> np.ndarray:
    c = np.ones(len(blocks)) if coefficients is None else np.asarray(coefficients, dtype=float)
    if c.shape != (len(blocks),) or (c < 0).any():
        raise ValueError(f"need {len(blocks)} non-negative coefficients, got {c.shape}")
    return c


def _best_per_block(blocks, c, key) -> list[int]:
    """Per block, the level index minimising `key(c·err, time)`."""
    return [min(range(len(b.levels)), key=lambda i, b=b, cb=cb: key(cb * b.errors[i], b.times[i]))
            for b, cb in zip(blocks, c)]


def _dp(blocks, costs, budget: float, buckets: int) -> list[int] | None:
    """The optimum over rounded-up bucket weights; None if no choice fits once rounded."""
    cost = np.full(buckets + 1, np.inf)  # cost[t]: best objective with rounded total time exactly t
    cost[0] = 0.0
    index_dtype = np.int16 if max(len(b.levels) for b in blocks) < 2**15 else np.int32
    arg = np.zeros((len(blocks), buckets + 1), dtype=index_dtype)
    weights = []
    for k, (b, e) in enumerate(zip(blocks, costs)):
        # Round UP so any solution of the rounded problem is within budget in exact time.
        w = [math.ceil(t * buckets / budget) for t in b.times]
        cand = np.full((len(w), buckets + 1), np.inf)  # (levels, buckets + 1)
        for i, wi in enumerate(w):
            if wi <= buckets:
                cand[i, wi:] = cost[: buckets + 1 - wi] + e[i]
        arg[k] = np.argmin(cand, axis=0)  # first minimum: ties go to the lower level index
        cost = cand.min(axis=0)
        weights.append(w)
    best = cost.min()
    if not np.isfinite(best):
        return None
    # Ties (up to float summation order): prefer the lowest rounded total time.
    t = int(np.flatnonzero(cost <= best + 1e-12 * max(1.0, abs(best)))[0])
    choice = [0] * len(blocks)
    for k in range(len(blocks) - 1, -1, -1):
        choice[k] = int(arg[k, t])
        t -= weights[k][choice[k]]
    return choice


def solve_dp(blocks: Sequence[BlockLevels], budget: float,
             coefficients: Sequence[float] | None = None, buckets: int = 10_000) -> list[int]:
    """Indices into each block's levels minimising Σ c·err with Σ time <= budget.

    Times are rounded up to buckets of width budget/buckets, so the result is within
    budget in exact time; the price is that choices within one bucket per block of the
    budget may be missed. If rounding excludes every choice although the budget is
    feasible, the DP is retried with 8x finer buckets, then the fastest choice is returned.
    """
    if not blocks:
        return []
    floor = minimum_time(blocks)
    if floor > budget:
        raise InfeasibleBudget(
            f"budget {budget:g} ms is below the minimum achievable time {floor:g} ms")
    c = _coefficients(blocks, coefficients)
    # The unconstrained optimum (ties to lower time) needs no DP when it already fits.
    free = _best_per_block(blocks, c, lambda e, t: (e, t))
    if total_time(blocks, free) <= budget:
        return free
    fastest = _best_per_block(blocks, c, lambda e, t: (t, e))
    if budget <= 0:  # only zero-time levels fit: exactly the fastest choice
        return fastest
    costs = [c[k] * np.asarray(b.errors, dtype=float) for k, b in enumerate(blocks)]
    for n in (buckets, 8 * buckets):
        choice = _dp(blocks, costs, budget, n)
        if choice is not None:
            return choice
        log.warning("budget %g ms infeasible after rounding to %d buckets", budget, n)
    return fastest


@dataclass(frozen=True)
class SearchResult:
    """The best choice found, its coefficients and score, and the search trace."""

    choice: list[int]
    coefficients: list[float]
    score: float
    evaluations: int
    history: list[float]  # best score after each call to `score`


class _Trace:
    """Scores choices once each (cached by choice), tracking the best seen."""

    def __init__(self, blocks, budget, score, buckets, progress):
        self.args = (blocks, budget, buckets)
        self.score, self.progress = score, progress
        self.cache: dict[tuple[int, ...], float] = {}
        self.solves = 0
        self.history: list[float] = []
        self.best = (math.inf, None, None)  # (score, choice, coefficients)

    def evaluate(self, c: np.ndarray) -> float:
        blocks, budget, buckets = self.args
        self.solves += 1
        choice = tuple(solve_dp(blocks, budget, c, buckets))
        if choice in self.cache:  # a distinct c, same choice: no new information
            return self.cache[choice]
        s = self.cache[choice] = float(self.score(list(choice)))
        if s < self.best[0] or self.best[1] is None:
            self.best = (s, list(choice), c.copy())
        self.history.append(self.best[0])
        if self.progress is not None:
            self.progress(len(self.history), self.best[0])
        return s


def spdy_search(blocks: Sequence[BlockLevels], budget: float,
                score: Callable[[list[int]], float], *, evaluations: int = 60, seed: int = 0,
                buckets: int = 10_000,
                progress: Callable[[int, float], None] | None = None) -> SearchResult:
    """Learn per-block coefficients c by SPDY search: the DP maps c to a choice, `score`
    (lower is better) judges it. Start from c = 1, then a quarter of the evaluations on
    uniform random c in [0, 1]^n, then local search resampling a shrinking subset of the
    best c. At most `evaluations` calls to `score` and 10x as many DP solves.
    """
    if evaluations < 1:
        raise ValueError("evaluations must be >= 1")
    n = len(blocks)
    rng = np.random.default_rng(seed)
    trace = _Trace(blocks, budget, score, buckets, progress)
    max_solves = 10 * evaluations  # cache hits cost no evaluation; this bounds the loop

    def running(target: int) -> bool:
        return len(trace.history) < target and trace.solves < max_solves

    trace.evaluate(np.ones(n))
    # Uniform in the box: the DP is invariant to scaling c, so the box covers every
    # direction, and zeros let a block be ignored entirely (SPDY §3.2).
    random_until = 1 + evaluations // 4
    while running(min(random_until, evaluations)) and n:
        trace.evaluate(rng.uniform(0.0, 1.0, n))
    start, most = len(trace.history), max(1, round(0.15 * n))
    while running(evaluations) and n:
        # Mutate ~15% of the blocks early, narrowing linearly to one (SPDY §3.2).
        done = (len(trace.history) - start) / max(1, evaluations - start)
        k = max(1, round(most * (1.0 - done)))
        c = trace.best[2].copy()
        idx = rng.choice(n, size=k, replace=False)
        c[idx] = rng.uniform(0.0, 1.0, k)
        trace.evaluate(c)
    best_score, best_choice, best_c = trace.best
    log.info("spdy: best score %.6g after %d evaluations, %d DP solves",
             best_score, len(trace.history), trace.solves)
    return SearchResult(best_choice, [float(x) for x in best_c], best_score,
                        len(trace.history), list(trace.history))
