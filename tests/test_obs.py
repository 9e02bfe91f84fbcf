"""Structured OBS against closed forms and brute-force least squares on tiny random layers.

The constant linking saliency and the output error: with H = 2 XᵀX / N and no damping,
tr(ΔW H ΔWᵀ) = (2/N) ||X ΔWᵀ||², so ρ_M = (2/N) · min ||X_S W_Sᵀ − X Wᵀ||² (S: all but M).
"""

import logging
import math

import pytest
import torch

from ziplm_planner.obs import (
    accumulate_hessian,
    group_saliencies,
    inverse_hessian,
    kept_columns,
    obs_prune,
    prepare_hessian,
    prune_heads_per_group,
    reconstruct_weights,
    relative_output_error,
)

F64 = torch.float64


def layer(seed: int, tokens: int = 64, d_out: int = 5, d_in: int = 12):
    """X (tokens, d_in) with correlated columns, W (d_out, d_in), H = 2 XᵀX / N."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=F64) + 0.3 * torch.randn(d_in, d_in, generator=g, dtype=F64)
    x = torch.randn(tokens, d_in, generator=g, dtype=F64) @ mix
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    return x, w, 2 * x.T @ x / tokens


def best_fit(x: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, ridge: float = 0.0,
             dense_x: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_V ||X_S Vᵀ − X' Wᵀ||² + ridge ||V − W_S||² by lstsq on explicit (ridge-augmented) rows;
    X' = `dense_x` (the same tokens' inputs in the dense model), else X."""
    a, b = x[:, cols], (x if dense_x is None else dense_x) @ w.T  # (N, |S|), (N, d_out)
    if ridge:
        a = torch.cat([a, math.sqrt(ridge) * torch.eye(len(cols), dtype=F64)])
        b = torch.cat([b, math.sqrt(ridge) * w[:, cols].T])
    return torch.linalg.lstsq(a, b).solution.T  # (d_out, |S|)


def test_accumulate_hessian_over_batches_equals_concatenation():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    h, n = None, 0
    for batch in (x[:13], x[13:13], x[13:40], x[40:]):
        h, n = accumulate_hessian(batch, h, n)
    x64 = x.to(F64)
    assert n == 50 and h.dtype == F64
    torch.testing.assert_close(h, 2 * x64.T @ x64 / 50, rtol=1e-12, atol=1e-12)
    assert accumulate_hessian(x[:0], h, n) == (h, n)


def test_accumulated_cross_term_is_x_transposed_y():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 6, generator=g)
    k, n = None, 0
    for rows in (slice(0, 11), slice(11, 30)):
        k, n = accumulate_hessian(x[rows], k, n, y[rows])
    torch.testing.assert_close(k, 2 * x.to(F64).T @ y.to(F64) / 30, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dampening", [0.0, 0.01])
@pytest.mark.parametrize("group_size", [1, 3])
def test_reconstruction_with_the_cross_term_fits_the_dense_output(group_size, dampening):
    """Inputs X̃ of a compressed model, X of the dense one: the kept weights minimise
    ||X̃_S W'ᵀ − X Wᵀ||² (+ the damping's ridge toward W_S), and equal plain OBS when X̃ = X."""
    dense_x, w, _ = layer(7)
    g = torch.Generator().manual_seed(8)
    x = dense_x + 0.3 * torch.randn(dense_x.shape, generator=g, dtype=F64)  # error of the layers before
    h, cross = 2 * x.T @ x / len(x), 2 * x.T @ dense_x / len(x)
    kept = [0, 2, 3] if group_size == 3 else [1, 4, 5, 8, 11]
    cols = kept_columns(kept, group_size)
    ridge = len(x) / 2 * dampening * h.diagonal().mean().item()
    corrected = reconstruct_weights(w, h, kept, group_size, dampening, cross=cross)
    torch.testing.assert_close(corrected, best_fit(x, w, cols, ridge, dense_x=dense_x), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(reconstruct_weights(w, h, kept, group_size, dampening, cross=h),
                               reconstruct_weights(w, h, kept, group_size, dampening), rtol=1e-10, atol=1e-12)
    to_dense = lambda v: (x[:, cols] @ v.T - dense_x @ w.T).square().sum()
    assert to_dense(corrected) < to_dense(reconstruct_weights(w, h, kept, group_size, dampening))


def test_kept_columns_sorted_groups():
    assert kept_columns([2, 0], 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert kept_columns([], 4).tolist() == []


@pytest.mark.parametrize("group_size", [1, 3])
def test_saliency_closed_form_on_diagonal_hessian(group_size):
    g = torch.Generator().manual_seed(1)
    diag = torch.rand(12, generator=g, dtype=F64) + 0.5
    w = torch.randn(4, 12, generator=g, dtype=F64)
    alive = torch.tensor([True, False] + [True] * (12 // group_size - 2))
    rho = group_saliencies(w, inverse_hessian(torch.diag(diag)), group_size, alive)
    expected = (diag * w.square().sum(0)).reshape(-1, group_size).sum(1)  # Σ_{j∈M} H_jj Σ_r W_rj²
    expected[1] = math.inf
    torch.testing.assert_close(rho, expected, rtol=1e-12, atol=0)


def test_batched_saliency_equals_per_group_solve():
    _, w, h = layer(2)
    h_inv = inverse_hessian(prepare_hessian(h)[0])
    rho = group_saliencies(w, h_inv, 4, torch.ones(3, dtype=torch.bool))
    for m, cols in enumerate(torch.arange(12).reshape(3, 4)):
        b = h_inv[cols][:, cols]
        torch.testing.assert_close(rho[m], torch.trace(w[:, cols] @ torch.linalg.inv(b) @ w[:, cols].T))


@pytest.mark.parametrize("group_size", [1, 3])
def test_saliency_is_least_squares_loss_of_removing_the_group(group_size):
    x, w, h = layer(3)
    h_inv = inverse_hessian(prepare_hessian(h, dampening=0.0)[0])
    num_groups = 12 // group_size
    rho = group_saliencies(w, h_inv, group_size, torch.ones(num_groups, dtype=torch.bool))
    for m in range(num_groups):
        kept = kept_columns([k for k in range(num_groups) if k != m], group_size)
        residual = (x[:, kept] @ best_fit(x, w, kept).T - x @ w.T).square().sum()
        torch.testing.assert_close(rho[m], 2 / len(x) * residual, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dampening", [0.0, 0.01])
@pytest.mark.parametrize("group_size", [1, 2])
def test_obs_snapshots_equal_reconstruction_and_brute_force(group_size, dampening):
    x, w, h = layer(4)
    num_groups = 12 // group_size
    trace = obs_prune(w, h, group_size, range(num_groups + 1), dampening=dampening, keep_weights=True)
    assert trace.levels == list(range(num_groups, -1, -1)) and sorted(trace.order) == list(range(num_groups))
    # H_d = 2XᵀX/N + λ·mean(diag H)·I: the damping is a ridge of N/2·λ·mean(diag H) on ||V − W_S||².
    ridge = len(x) / 2 * dampening * h.diagonal().mean().item()
    for level, error in zip(trace.levels, trace.errors):
        kept_groups = sorted(set(range(num_groups)) - set(trace.order[: num_groups - level]))
        cols = kept_columns(kept_groups, group_size)
        snapshot = trace.weights[level]
        removed = torch.ones(12, dtype=torch.bool)
        removed[cols] = False
        assert snapshot.shape == w.shape and not snapshot[:, removed].any()
        torch.testing.assert_close(
            snapshot[:, cols], reconstruct_weights(w, h, kept_groups, group_size, dampening), rtol=1e-9, atol=1e-10
        )
        torch.testing.assert_close(snapshot[:, cols], best_fit(x, w, cols, ridge), rtol=1e-8, atol=1e-9)
        explicit = (x @ (snapshot - w).T).square().sum() / (x @ w.T).square().sum()
        assert error == pytest.approx(relative_output_error(w, snapshot, h), rel=1e-9, abs=1e-12)
        assert error == pytest.approx(explicit.item(), rel=1e-9, abs=1e-12)


def test_greedy_removes_the_group_with_tiny_weights_first():
    _, w, h = layer(5)
    w[:, 6:9] *= 1e-3
    assert obs_prune(w, h, 3, [3]).order[0] == 2


def test_greedy_order_on_diagonal_hessian_follows_closed_form():
    g = torch.Generator().manual_seed(6)
    diag = torch.rand(10, generator=g, dtype=F64) + 0.1
    w = torch.randn(3, 10, generator=g, dtype=F64)
    # Diagonal H: removing one column updates no other, so the order is the initial ranking.
    trace = obs_prune(w, torch.diag(diag), 1, [0], dampening=0.0)
    assert trace.order == torch.argsort(diag * w.square().sum(0)).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_errors_zero_at_full_one_at_empty_and_monotone(dtype):
    _, w, h = layer(7, d_in=24)
    trace = obs_prune(w.float(), h, 2, range(0, 13), dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert trace.levels[0] == 12 and trace.errors[0] == pytest.approx(0.0, abs=tol)
    assert trace.levels[-1] == 0 and trace.errors[-1] == pytest.approx(1.0, abs=tol)
    assert all(a <= b + tol for a, b in zip(trace.errors, trace.errors[1:]))
    assert trace.weights is None


def test_float32_follows_float64():
    _, w, h = layer(8, d_in=24)
    exact, fast = obs_prune(w, h, 1, [16, 8, 0]), obs_prune(w, h, 1, [16, 8, 0], dtype=torch.float32)
    assert fast.order[:8] == exact.order[:8]
    assert fast.errors == pytest.approx(exact.errors, rel=1e-4, abs=1e-6)


def test_dead_group_is_removed_first_at_zero_cost():
    x, w, h = layer(9)
    x[:, 4:6] = 0  # group 2 (group_size 2) never sees an input
    h = 2 * x.T @ x / len(x)
    trace = obs_prune(w, h, 2, [6, 5, 0], keep_weights=True)
    assert trace.order[0] == 2
    assert trace.errors[1] == pytest.approx(0.0, abs=1e-12) and trace.errors[2] == pytest.approx(1.0)
    assert all(math.isfinite(e) for e in trace.errors)
    assert all(torch.isfinite(s).all() and not s[:, 4:6].any() for s in trace.weights.values())


def test_prepare_hessian_sets_dead_diagonal_to_one_then_damps_a_copy():
    h = torch.diag(torch.tensor([2.0, 0.0, 4.0, 0.0], dtype=F64))
    h_d, dead = prepare_hessian(h, dampening=0.1)
    assert dead.tolist() == [False, True, False, True] and h[1, 1] == 0
    expected = torch.diag(torch.tensor([2.0, 1.0, 4.0, 1.0], dtype=F64)) + 0.1 * 2.0 * torch.eye(4, dtype=F64)
    torch.testing.assert_close(h_d, expected)


def test_dead_columns_need_no_dampening(caplog):
    x, w, _ = layer(9)
    x[:, 4:6] = 0
    with caplog.at_level(logging.WARNING, logger="ziplm_planner.obs"):
        trace = obs_prune(w, 2 * x.T @ x / len(x), 2, [5], dampening=0.0)
    assert trace.order == [2] and not caplog.text


def test_non_finite_hessian_raises():
    _, w, h = layer(10)
    h[3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        prepare_hessian(h)
    h[3, 3] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs_prune(w, h, 1, [0])


def test_levels_outside_range_raise():
    _, w, h = layer(11)
    for levels in ([13], [-1], []):
        with pytest.raises(ValueError):
            obs_prune(w, h, 1, levels)


def test_singular_hessian_retries_with_more_damping(caplog):
    h = torch.ones(3, 3, dtype=F64)  # PSD, rank 1: Cholesky hits a zero pivot
    with caplog.at_level(logging.WARNING, logger="ziplm_planner.obs"):
        h_inv = inverse_hessian(prepare_hessian(h, dampening=0.0)[0])
    assert "Cholesky" in caplog.text and torch.isfinite(h_inv).all()
    torch.testing.assert_close(h_inv, torch.linalg.inv(h + 1e-3 * torch.eye(3, dtype=F64)))


def test_indefinite_hessian_falls_back_to_pinv(caplog):
    _, w, _ = layer(12, d_in=2)
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3 and −1
    with caplog.at_level(logging.WARNING, logger="ziplm_planner.obs"):
        trace = obs_prune(w, h, 1, [1, 0], dampening=0.0)
    assert "pseudo-inverse" in caplog.text
    assert all(math.isfinite(e) for e in trace.errors)


# --- query heads inside KV groups ----------------------------------------------------------------


def test_each_round_removes_one_head_from_every_group_with_least_squares_weights():
    """3 groups of 3 heads, head_dim 2: rounds keep 2 then 1 heads in every group, nested, and the error
    of each round is that of the least-squares weights of the heads it keeps."""
    x, w, h = layer(0, tokens=96, d_in=18)
    rounds = prune_heads_per_group(w, h, range(9), per_group=3, head_dim=2, down_to=1, dampening=0.0)
    assert len(rounds) == 2
    previous = set(range(9))
    for per_group, (kept, error) in zip((2, 1), rounds):
        assert sorted(g for g in (head // 3 for head in kept)) == sorted([0, 1, 2] * per_group)
        assert set(kept) < previous
        previous = set(kept)
        cols = kept_columns(kept, 2)
        full = torch.zeros_like(w)
        full[:, cols] = best_fit(x, w, cols)
        assert error == pytest.approx(relative_output_error(w, full, h), rel=1e-6)


def test_a_round_is_the_best_choice_of_one_head_per_group_when_groups_are_independent():
    """With groups that share no input correlation, the output error adds over groups, so the greedy
    round finds the combination brute force over every choice of one head per group finds."""
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(40, 6, generator=g, dtype=F64) @ (torch.eye(6, dtype=F64) + 0.5 * torch.randn(6, 6, generator=g, dtype=F64))
              for _ in range(2)]
    x = torch.cat([torch.cat([b, torch.zeros_like(b)], 1) if i == 0 else torch.cat([torch.zeros_like(b), b], 1)
                   for i, b in enumerate(blocks)], 0)  # (80, 12): group 0 = heads 0-2, group 1 = heads 3-5
    w = torch.randn(4, 12, generator=g, dtype=F64)
    h = 2 * x.T @ x / len(x)
    (kept, error), = prune_heads_per_group(w, h, range(6), per_group=3, head_dim=2, down_to=2, dampening=0.0)

    def error_without(a, b):
        cols = kept_columns(sorted(set(range(6)) - {a, b}), 2)
        full = torch.zeros_like(w)
        full[:, cols] = best_fit(x, w, cols)
        return relative_output_error(w, full, h)

    best = min(((a, b) for a in range(3) for b in range(3, 6)), key=lambda pair: error_without(*pair))
    assert set(range(6)) - set(kept) == set(best)
    assert error == pytest.approx(error_without(*best), rel=1e-9)
