"""The DP against exhaustive enumeration, and the SPDY search on hidden sensitivities."""

import itertools
import math
import random

import pytest

from ziplm_planner.search import (
    BlockLevels, InfeasibleBudget, SearchResult, minimum_time, solve_dp, spdy_search,
    total_error, total_time,
)


def random_blocks(rng: random.Random, n_blocks: int, integer_times: bool) -> list[BlockLevels]:
    """Blocks whose level 0 keeps nothing (time 0, largest error) and whose densest level
    has error 0; times and errors otherwise random (not monotone, to stress the DP)."""
    blocks = []
    for b in range(n_blocks):
        n = rng.randint(2, 5)
        times = [0.0] + [float(rng.randint(1, 20)) if integer_times else rng.uniform(0.1, 5.0)
                         for _ in range(n - 1)]
        errors = [1.0] + [rng.uniform(0.0, 0.9) for _ in range(n - 2)] + [0.0]
        blocks.append(BlockLevels(f"b{b}", tuple(range(n)), tuple(times), tuple(errors)))
    return blocks


def all_choices(blocks):
    return itertools.product(*(range(len(b.levels)) for b in blocks))


def exhaustive_optimum(blocks, fits, coefficients) -> float:
    return min(total_error(blocks, ch, coefficients) for ch in all_choices(blocks) if fits(ch))


def budgets(blocks):
    lo = minimum_time(blocks)
    hi = sum(max(b.times) for b in blocks)
    return [lo + f * (hi - lo) for f in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)]


def test_dp_matches_exhaustive_when_times_are_whole_buckets():
    rng = random.Random(1)
    for _ in range(100):
        blocks = random_blocks(rng, rng.randint(3, 5), integer_times=True)
        c = [rng.choice([0.0, rng.uniform(0.1, 3.0)]) for _ in blocks]
        for budget in {math.floor(t) for t in budgets(blocks)}:
            # One bucket per ms: integer times round to themselves, so the DP is exact.
            choice = solve_dp(blocks, budget, c, buckets=max(1, budget))
            best = exhaustive_optimum(blocks, lambda ch: total_time(blocks, ch) <= budget, c)
            assert total_time(blocks, choice) <= budget
            assert total_error(blocks, choice, c) == pytest.approx(best, rel=1e-12, abs=1e-12)


def test_dp_with_rounding_is_feasible_and_optimal_over_rounded_times():
    rng = random.Random(2)
    for _ in range(100):
        blocks = random_blocks(rng, rng.randint(3, 5), integer_times=False)
        c = [rng.uniform(0.0, 2.0) for _ in blocks]
        for budget in budgets(blocks)[1:]:
            buckets = rng.choice([7, 50, 1000])
            choice = solve_dp(blocks, budget, c, buckets=buckets)
            width = budget / buckets

            def fits_rounded(ch):
                return sum(math.ceil(b.times[i] / width) for b, i in zip(blocks, ch)) <= buckets

            def fits(ch):
                return total_time(blocks, ch) <= budget

            objective = total_error(blocks, choice, c)
            assert fits(choice)
            # Never worse than the rounded problem's optimum, never better than the exact one.
            if any(fits_rounded(ch) for ch in all_choices(blocks)):
                assert objective <= exhaustive_optimum(blocks, fits_rounded, c) + 1e-12
            assert objective >= exhaustive_optimum(blocks, fits, c) - 1e-12


def test_rounding_infeasible_budget_still_gets_a_feasible_choice():
    # 0.55 + 0.45 = 1.0 fits exactly, but at 10 buckets the weights round to 6 + 5 = 11.
    blocks = [BlockLevels("a", (0, 1), (0.55, 0.6), (1.0, 0.0)),
              BlockLevels("b", (0, 1), (0.45, 0.5), (1.0, 0.0))]
    choice = solve_dp(blocks, 1.0, buckets=10)
    assert choice == [0, 0]
    assert total_time(blocks, choice) <= 1.0


def test_rounding_infeasible_budget_is_retried_with_finer_buckets():
    # Fastest is 0.55 + 0.41 (6 + 5 > 10 buckets); at 80 buckets 0.56 + 0.43 fits (45 + 35).
    blocks = [BlockLevels("a", (0, 1, 2), (0.55, 0.56, 0.9), (1.0, 0.5, 0.0)),
              BlockLevels("b", (0, 1, 2), (0.41, 0.43, 0.9), (1.0, 0.5, 0.0))]
    choice = solve_dp(blocks, 1.0, buckets=10)
    assert choice == [1, 1]
    assert total_time(blocks, choice) <= 1.0


def test_ties_prefer_lower_time():
    blocks = [BlockLevels("a", (0, 1, 2), (0.0, 1.0, 2.0), (0.5, 0.0, 0.0)),
              BlockLevels("b", (0, 1, 2), (0.0, 2.0, 1.0), (1.0, 0.2, 0.2))]
    assert solve_dp(blocks, 2.0, buckets=100) == [1, 2]
    assert solve_dp(blocks, 10.0, buckets=100) == [1, 2]  # unconstrained path too


def test_budget_below_minimum_time_raises_naming_both_numbers():
    blocks = [BlockLevels("a", (4, 8), (1.25, 2.0), (0.3, 0.0)),
              BlockLevels("b", (4, 8), (2.0, 3.0), (0.3, 0.0))]
    assert minimum_time(blocks) == 3.25
    with pytest.raises(InfeasibleBudget) as excinfo:
        solve_dp(blocks, 1.5)
    assert "1.5" in str(excinfo.value) and "3.25" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert solve_dp(blocks, 3.25) == [0, 0]  # exactly the minimum is feasible


def test_budget_at_or_above_max_time_returns_densest_choice():
    rng = random.Random(3)
    for _ in range(50):
        blocks = random_blocks(rng, rng.randint(1, 6), integer_times=False)
        densest = [len(b.levels) - 1 for b in blocks]
        full = total_time(blocks, densest)
        for budget in (full, full * 1.5):
            choice = solve_dp(blocks, budget)
            assert total_error(blocks, choice) == 0.0
            assert total_time(blocks, choice) <= total_time(blocks, densest)


def test_zero_coefficient_puts_block_at_cheapest_level():
    rng = random.Random(4)
    for _ in range(50):
        blocks = random_blocks(rng, 4, integer_times=False)
        budget = budgets(blocks)[3]
        c = [1.0, 0.0, 1.0, 1.0]
        choice = solve_dp(blocks, budget, c)
        assert blocks[1].times[choice[1]] == min(blocks[1].times)


def test_blocks_validate_their_tables():
    with pytest.raises(ValueError):
        BlockLevels("x", (0, 1), (0.0,), (1.0, 0.0))
    with pytest.raises(ValueError):
        BlockLevels("x", (0, 1), (0.0, -1.0), (1.0, 0.0))
    with pytest.raises(ValueError):
        solve_dp([BlockLevels("x", (0, 1), (0.0, 1.0), (1.0, 0.0))], 1.0, [1.0, 2.0])


def hidden_problem(seed: int, n_blocks: int = 5):
    """A small problem, hidden coefficients that define the true score, and the
    exhaustive optimum of that score within budget."""
    rng = random.Random(seed)
    blocks = random_blocks(rng, n_blocks, integer_times=True)
    hidden = [rng.uniform(0.0, 5.0) for _ in blocks]
    budget = math.floor(budgets(blocks)[2])
    best = exhaustive_optimum(blocks, lambda ch: total_time(blocks, ch) <= budget, hidden)
    return blocks, budget, hidden, best


def test_spdy_finds_hidden_optimum_and_never_loses_to_plain_dp():
    found = 0
    for seed in range(10):
        blocks, budget, hidden, best = hidden_problem(seed)
        calls = []

        def score(choice):
            calls.append(tuple(choice))
            return total_error(blocks, choice, hidden)

        result = spdy_search(blocks, budget, score, evaluations=40, seed=seed, buckets=budget)
        plain = total_error(blocks, solve_dp(blocks, budget, buckets=budget), hidden)
        assert result.score <= plain
        assert result.score >= best - 1e-12
        assert result.score == score(result.choice)
        assert total_time(blocks, result.choice) <= budget
        assert solve_dp(blocks, budget, result.coefficients, budget) == result.choice
        assert len(calls) - 1 == len(set(calls[:-1]))  # each choice scored once
        found += result.score == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert found >= 9


@pytest.mark.parametrize("evaluations", [1, 2, 7, 30])
def test_spdy_respects_evaluation_bound_and_reports_progress(evaluations):
    blocks, budget, hidden, _ = hidden_problem(11)
    calls, seen = [], []

    def score(choice):
        calls.append(choice)
        return total_error(blocks, choice, hidden)

    result = spdy_search(blocks, budget, score, evaluations=evaluations,
                         progress=lambda i, s: seen.append((i, s)))
    assert isinstance(result, SearchResult)
    assert 1 <= len(calls) <= evaluations
    assert result.evaluations == len(calls) == len(result.history)
    assert seen == list(enumerate(result.history, start=1))
    assert all(a >= b for a, b in zip(result.history, result.history[1:]))
    assert result.history[-1] == result.score
    assert result.history[0] == total_error(blocks, solve_dp(blocks, budget), hidden)


def test_spdy_terminates_when_every_c_gives_the_same_choice():
    blocks = [BlockLevels(f"b{i}", (0, 1), (0.0, 1.0), (1.0, 0.0)) for i in range(3)]
    calls = []
    result = spdy_search(blocks, 3.0, lambda ch: calls.append(ch) or 0.0, evaluations=50)
    assert len(calls) == 1 and result.evaluations == 1 and result.choice == [1, 1, 1]


def test_spdy_is_deterministic_for_a_seed():
    blocks, budget, hidden, _ = hidden_problem(12, n_blocks=8)

    def run(seed):
        return spdy_search(blocks, budget, lambda ch: total_error(blocks, ch, hidden),
                           evaluations=25, seed=seed, buckets=budget)

    assert run(5) == run(5)
    a, b = run(5), run(6)
    assert a.coefficients != b.coefficients or a.history != b.history
