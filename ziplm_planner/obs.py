"""Structured Optimal Brain Surgeon for one linear layer, as in ZipLM (Kurtic, Frantar, Alistarh 2023).

W is (d_out, d_in) in nn.Linear layout; its input columns form `num_groups` consecutive
groups of `group_size` columns (a head, a KV group, an FFN neuron). On calibration
inputs X (N, d_in) the layer's loss is quadratic in the weights:

    H = 2 XᵀX / N                          dead columns (H_jj = 0): H_jj = 1, W_:j = 0
    H_d = H + λ · mean(diag H) · I          dampening, λ ≈ 0.01
    L(W') = tr((W' − W) H_d (W' − W)ᵀ)      = 2/N ||(W' − W) Xᵀ||² when λ = 0

For a group M of columns, with B = (H_d⁻¹)_{M,M}:

    ρ_M   = Σ_rows W_{r,M} B⁻¹ W_{r,M}ᵀ                   increase of L when M is removed
    W    ← W − W_{:,M} B⁻¹ (H_d⁻¹)_{M,:}                  optimal update of the other columns
    H_d⁻¹ ← H_d⁻¹ − (H_d⁻¹)_{:,M} B⁻¹ (H_d⁻¹)_{M,:}       inverse of H_d with M removed

Greedy removal of argmin ρ with both updates is an exact least-squares solve for the
removed set S̄, so the weights at any level equal W'_S = W H_d[:, S] (H_d[S, S])⁻¹
(`reconstruct_weights`). The error reported per level is the relative output error
||(W' − W) Xᵀ||² / ||W Xᵀ||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with the undamped H.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_RETRY_DAMPING = (1e-3, 1e-2, 1e-1)  # extra diagonal after a failed Cholesky, × mean(diag H)


def accumulate_hessian(x: Tensor, hessian: Tensor | None, count: int, y: Tensor | None = None) -> tuple[Tensor, int]:
    """Running mean of H = 2 XᵀX / N in float64 over batches x (tokens, d_in); returns (H, N).
    With `y` (the same tokens' inputs in another model), the cross term 2 XᵀY / N instead."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    y = x if y is None else y.reshape(-1, y.shape[-1]).to(torch.float64)
    n = x.shape[0]
    if n == 0:
        return hessian, count
    if hessian is None:
        hessian = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
    # Rescale the old mean before adding: keeps entries O(1) for any number of tokens.
    hessian = hessian * (count / (count + n)) + (x.T @ y) * (2.0 / (count + n))
    return hessian, count + n


def prepare_hessian(hessian: Tensor, dampening: float = 0.01) -> tuple[Tensor, Tensor]:
    """(H_damped, dead): a float64 copy with dead diagonals set to 1, plus λ·mean(diag)·I."""
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian has NaN or Inf")
    h = hessian.to(torch.float64, copy=True)
    diag = h.diagonal()  # a view: writes go to h
    dead = diag == 0
    diag[dead] = 1.0  # a column never seen in calibration: keep H invertible (as gptq does)
    diag += dampening * diag.mean()
    return h, dead


def _invert(h: Tensor) -> tuple[Tensor, float | None]:
    """(H⁻¹, diagonal that had to be added to factor H; None when only pinv worked)."""
    scale = h.diagonal().abs().mean().item() or 1.0
    added = 0.0
    for extra in (0.0, *_RETRY_DAMPING):
        if extra:
            log.warning("Cholesky of the Hessian failed; retrying with %.0e * mean(diag) added", extra)
            added = extra * scale
        chol, info = torch.linalg.cholesky_ex(h + added * torch.eye(len(h), dtype=h.dtype, device=h.device))
        if info.item() == 0:
            return torch.cholesky_inverse(chol), added
    log.warning("Hessian is not positive definite even with damping; using the pseudo-inverse")
    return torch.linalg.pinv(h, hermitian=True), None


def inverse_hessian(h_damped: Tensor) -> Tensor:
    """H⁻¹ by Cholesky; more damping, then pinv, when the factorisation fails (with a warning)."""
    return _invert(h_damped)[0]


def kept_columns(kept_groups: Sequence[int] | Tensor, group_size: int) -> Tensor:
    """Sorted column indices (long) of the given groups."""
    groups = torch.as_tensor(kept_groups, dtype=torch.long).reshape(-1).sort().values
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)


def spd_solve(A: Tensor, B: Tensor) -> Tensor:
    """A⁻¹ B for symmetric positive definite A (batched): Cholesky, not LU. Blocks of an inverse
    Hessian are SPD, and batched LU on CPU (MKL getrf) was seen to fail intermittently on them."""
    L, info = torch.linalg.cholesky_ex(A)
    if bool(info.any()):  # round-off made a block indefinite: a jitter far below the dampening
        jitter = 1e-10 * A.diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1)[..., None, None]
        L = torch.linalg.cholesky(A + jitter * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device))
    return torch.cholesky_solve(B, L)


def group_saliencies(W: Tensor, h_inv: Tensor, group_size: int, alive: Tensor) -> Tensor:
    """ρ_M = Σ_rows W_{r,M} B⁻¹ W_{r,M}ᵀ, B = (H⁻¹)_{M,M}, for every group; +inf where not alive."""
    d_out, d_in = W.shape
    if group_size == 1:  # B is the scalar [H⁻¹]_jj: ρ_j = Σ_r W_rj² / [H⁻¹]_jj
        rho = torch.linalg.vector_norm(W, dim=0).square_() / h_inv.diagonal()
        return rho.masked_fill_(~alive, math.inf)
    num_groups = d_in // group_size
    rho = torch.full((num_groups,), math.inf, dtype=W.dtype, device=W.device)
    idx = alive.nonzero().squeeze(1)
    blocks = h_inv.reshape(num_groups, group_size, num_groups, group_size)
    blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)[idx]  # (alive, g, g) diagonal blocks B
    w_m = W.reshape(d_out, num_groups, group_size)[:, idx].permute(1, 2, 0)  # (alive, g, d_out) = W_{:,M}ᵀ
    rho[idx] = (w_m * spd_solve(blocks, w_m)).sum(dim=(1, 2))
    return rho


def relative_output_error(W: Tensor, W_new: Tensor, hessian: Tensor) -> float:
    """||W_new X − W X||² / ||W X||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), from H alone (undamped)."""
    h, W = hessian.to(torch.float64), W.to(torch.float64)
    delta = W_new.to(torch.float64) - W  # (d_out, d_in)
    num, den = ((delta @ h) * delta).sum().item(), ((W @ h) * W).sum().item()
    if den <= 0:  # W X = 0: nothing to lose
        return 0.0 if num <= 0 else math.inf
    return num / den


@dataclass(frozen=True)
class PruneTrace:
    """Greedy removal order, and error (and weights if asked) at each requested level."""

    order: list[int]  # group ids in removal order, length num_groups − min(levels)
    levels: list[int]  # groups kept, descending
    errors: list[float]  # relative output error per level
    weights: dict[int, Tensor] | None  # level -> (d_out, d_in) with removed columns zero


def _num_groups(W: Tensor, hessian: Tensor, group_size: int) -> int:
    d_in = W.shape[1]
    if hessian.shape != (d_in, d_in) or group_size < 1 or d_in % group_size:
        raise ValueError(f"W {tuple(W.shape)}, hessian {tuple(hessian.shape)}, group_size {group_size} do not fit")
    return d_in // group_size


def obs_prune(
    W: Tensor,
    hessian: Tensor,
    group_size: int,
    levels: Sequence[int],
    dampening: float = 0.01,
    keep_weights: bool = False,
    *,
    dtype: torch.dtype = torch.float64,
) -> PruneTrace:
    """Greedy structured OBS from all groups down to min(levels).

    Errors come from the damped loss L = Σ ρ (exact under OBS updates) less the damping's
    share, tr(ΔW H ΔWᵀ) = L − λ' ||ΔW||², which saves a (d_out, d_in, d_in) product per
    level; they equal `relative_output_error(W, weights[level], hessian)`.
    `dtype` is the working precision of W and H⁻¹ (H⁻¹ itself is computed in float64).
    float64 is the default: it matches `reconstruct_weights` to ~1e-13 where float32 drifts
    to ~1e-6, for ~1.5x the time. W (384, 1536), group_size 1, all 1536 columns removed, 2-core
    CPU: ~1.0 s in float64, ~0.7 s in float32 (of which ~0.2 s is the initial Cholesky).
    """
    num_groups = _num_groups(W, hessian, group_size)
    levels = sorted({int(k) for k in levels}, reverse=True)
    if not levels or levels[-1] < 0 or levels[0] > num_groups:
        raise ValueError(f"levels must be non-empty and within [0, {num_groups}], got {levels}")
    d_out, d_in = W.shape
    h, dead = prepare_hessian(hessian, dampening)
    h_plain = prepare_hessian(hessian, 0.0)[0]  # undamped H of the output error
    h_inv, added = _invert(h)
    # λ' = H_d − H on the diagonal: λ·mean(diag H) plus any damping a failed Cholesky added
    ridge = None if added is None else (h[0, 0] - h_plain[0, 0]).item() + added
    w0 = W.to(torch.float64).masked_fill(dead, 0.0)
    base = ((w0 @ h_plain) * w0).sum().item()

    # y = [H⁻¹ | Wᵀ], one row per stored input column: W and H⁻¹ get the same update,
    #     Wᵀ ← Wᵀ − (H⁻¹)_{:,M} B⁻¹ (Wᵀ)_{M,:},  H⁻¹ ← H⁻¹ − (H⁻¹)_{:,M} B⁻¹ (H⁻¹)_{M,:}.
    # Removed rows/columns are zero; they are dropped once a quarter of y is dead.
    y = torch.cat([h_inv, w0.T], dim=1).to(dtype)  # (d_in, d_in + d_out)
    ids = torch.arange(num_groups, device=y.device)  # original id of each stored group
    alive = torch.ones(num_groups, dtype=torch.bool, device=y.device)
    order, errors, weights, loss, n_in = [], [], {}, 0.0, d_in  # n_in: stored input columns
    for level in range(num_groups, levels[-1] - 1, -1):
        if level in levels:
            w_new = torch.zeros_like(w0)
            stored = kept_columns(alive.nonzero(), group_size)
            w_new[:, kept_columns(ids[alive], group_size)] = y[stored, n_in:].T.to(torch.float64)
            if ridge is None:  # pinv fallback: Σ ρ is not the loss of a known H_d
                errors.append(relative_output_error(w0, w_new, h_plain))
            elif base > 0:  # max: round-off only, as L ≥ λ' ||ΔW||²
                errors.append(max(0.0, loss - ridge * (w_new - w0).square().sum().item()) / base)
            else:
                errors.append(0.0)
            if keep_weights:
                weights[level] = w_new.to(W.dtype)
        if level == levels[-1]:
            break
        rho = group_saliencies(y[:, n_in:].T, y[:, :n_in], group_size, alive)
        i = int(rho.argmin())
        m = slice(i * group_size, (i + 1) * group_size)
        loss += rho[i].item()
        if group_size == 1:  # column i; a rank-1 update is ~2x faster than solve + addmm
            y.addr_(y[:, i].clone(), y[i] / y[i, i], alpha=-1.0)
        else:
            y.addmm_(y[:, m].clone(), spd_solve(y[m, m], y[m]), alpha=-1.0)
        y[m] = 0.0  # exact zeros where round-off would leave ~eps
        y[:, m] = 0.0
        alive[i] = False
        order.append(int(ids[i]))
        if 4 * (level - 1) <= 3 * len(ids):  # a quarter of the stored groups are gone: drop them
            keep = alive.nonzero().squeeze(1)
            cols = kept_columns(keep, group_size)
            y = y[cols][:, torch.cat([cols, torch.arange(n_in, n_in + d_out, device=y.device)])]
            ids, alive, n_in = ids[keep], alive[keep], len(cols)
    return PruneTrace(order, levels, errors, weights if keep_weights else None)


def reconstruct_weights(
    W: Tensor, hessian: Tensor, kept_groups: Sequence[int], group_size: int, dampening: float = 0.01,
    cross: Tensor | None = None,
) -> Tensor:
    """Least-squares weights of the kept columns: W'_S = W H_d[:, S] (H_d[S, S])⁻¹.

    With a cross term K = 2 X̃ᵀX / N, where X̃ are the inputs of the model compressed so far (the
    Hessian is then 2 X̃ᵀX̃ / N) and X those of the dense model on the same tokens, the kept weights
    are fit to the dense output instead: argmin ||X̃_S W'ᵀ − X Wᵀ||² + λ||W' − W_S||², i.e.
    W'ᵀ = (H_d[S, S])⁻¹ (K[S, :] Wᵀ + λ W_Sᵀ), which is the first form when X̃ = X.

    Returns (d_out, len(kept_groups) * group_size), columns in `kept_columns` order. Without a
    cross term it equals obs_prune's weights for the same removed set, so a removal order is
    enough to store.
    """
    _num_groups(W, hessian, group_size)
    h, dead = prepare_hessian(hessian, dampening)
    w0 = W.to(torch.float64).masked_fill(dead, 0.0)
    cols = kept_columns(kept_groups, group_size)
    if cross is None:
        rhs = h[cols] @ w0.T  # H_d[S, :] Wᵀ: H_d is symmetric
    else:
        ridge = (h.diagonal() - hessian.diagonal().to(torch.float64))[cols]  # λ (and 1 where dead)
        rhs = cross.to(torch.float64)[cols] @ w0.T + ridge[:, None] * w0[:, cols].T
    w_s = spd_solve(h[cols][:, cols], rhs).T
    return w_s.to(W.dtype)


def prune_heads_per_group(
    W: Tensor, hessian: Tensor, kept_heads: Sequence[int], per_group: int, head_dim: int, down_to: int,
    dampening: float = 0.01,
) -> list[tuple[list[int], float]]:
    """Greedy structured OBS under grouped-query attention: each round removes one query head from
    every KV group, so all groups keep as many heads; within a round, the head of least ρ among the
    groups that have not yet lost one, with the weights and H⁻¹ of the heads still kept.

    W (d_out, d_in) is the output projection, its input columns `head_dim` per query head; heads
    `kept_heads` (each group with `per_group` of them) are where the rounds start. Returns, after
    each round down to `down_to` heads per group, (kept heads, relative output error against W).
    """
    _num_groups(W, hessian, head_dim)
    h, dead = prepare_hessian(hessian, dampening)
    h_plain = prepare_hessian(hessian, 0.0)[0]
    w0 = W.to(torch.float64).masked_fill(dead, 0.0)
    kept, rounds = sorted(kept_heads), []
    for _ in range(per_group - down_to):
        waiting = {head // per_group for head in kept}  # groups yet to lose a head this round
        while waiting:
            cols = kept_columns(kept, head_dim)
            h_inv = inverse_hessian(h[cols][:, cols])
            w_kept = (h_inv @ (h[cols] @ w0.T)).T  # OBS weights of the kept columns: W H_d[:, S] H_d[S, S]⁻¹
            alive = torch.tensor([head // per_group in waiting for head in kept])
            head = kept[int(group_saliencies(w_kept, h_inv, head_dim, alive).argmin())]
            waiting.discard(head // per_group)
            kept.remove(head)
        w_new = torch.zeros_like(w0)
        w_new[:, kept_columns(kept, head_dim)] = reconstruct_weights(w0, hessian, kept, head_dim, dampening)
        rounds.append((list(kept), relative_output_error(w0, w_new, h_plain)))
    return rounds
