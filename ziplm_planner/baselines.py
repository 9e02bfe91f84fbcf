"""Baselines on ZipLM's latency table and budgets, so that only the choice of structures differs.

- magnitude: structured weight-norm pruning; per-block levels by the same DP as ZipLM, with the
  block error at a level the fraction of squared weight norm removed; no weight updates.
- uniform: one keep ratio for every attention and FFN block (rounded to table levels), the largest
  that fits; structures by weight norm; no weight updates.
- layerdrop: ShortGPT (Men et al. 2024): drop whole layers by increasing block influence
  BI_l = 1 - E[cos(x_l, x_{l+1})] until the model fits; no weight updates.
- kwon: Kwon et al. 2022: Fisher information of head/neuron masks (§3), mask search under the
  latency table (§4.1, as a DP), mask rearrangement with the block-diagonal Fisher (§4.2, Alg. 2),
  least-squares mask tuning (§4.3) folded into the output projections' columns.

A mask variable multiplies a structure's columns of its block's output projection INPUT (a head's
output or a neuron's activation): a pre-hook, architecture-agnostic through the adapters.

Baselines prune attention by units: heads, or under grouped-query attention whole KV groups (as the
methods were published); only ZipLM also removes query heads inside groups.
"""

from __future__ import annotations

import copy
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import (ATTENTION, BLOCKS, FFN, AttentionLevel, ModelShape, architecture_for, get_module,
                       model_layers, model_shape)
from .calibrate import Calibration
from .errors import UserError
from .progress import stage
from .fisher import fisher_targets, mask_gradients
from .layers import LayerInput, capture_inputs, output_projection, propagate, run_layer, weight_out_in
from .models import LoadedModel
from .search import BlockLevels, solve_dp
from .stitch import prune_block
from .surgery import PruningPlan, count_parameters, unit_heads
from .table import LatencyTable

log = logging.getLogger(__name__)

MASK_DAMPENING = 0.1  # mask tuning: ridge towards the untuned mask, x mean(diag G); guards overfitting
MAX_MASK = 10.0  # Kwon's guard: tuned mask values beyond ±10 mean an ill-posed solve; keep 1
UNIFORM_GRID = 4096  # keep ratios scanned by `uniform`, besides every table level's own ratio


# --- units -----------------------------------------------------------------------------------------


def unit_width(shape: ModelShape, block: str) -> int:
    """Output-projection input columns of one unit: a KV group's query heads, or a neuron."""
    return shape.q_per_unit * shape.head_dim if block == ATTENTION else 1


def total_units(shape: ModelShape, block: str) -> int:
    return shape.attention_units if block == ATTENTION else shape.intermediate_size


def unit_level(shape: ModelShape, block: str, units: int) -> AttentionLevel | int:
    """The table level of a block keeping `units` whole units."""
    return shape.whole_groups(units) if block == ATTENTION else units


def unit_levels(table: LatencyTable, block: str) -> list[int]:
    """Unit counts the table timed, 0 (removed) first."""
    return [0, *(level.groups for level in table.whole_groups())] if block == ATTENTION else [0, *table.levels(FFN)]


# --- weight magnitude -----------------------------------------------------------------------------


def present_structures(layer: nn.Module, config, block: str) -> int:
    """How many structures a block of a (possibly pruned) layer still has; 0 once removed."""
    projection = output_projection(layer, config, block)
    return 0 if projection is None else weight_out_in(projection).shape[1] // unit_width(model_shape(config), block)


def magnitude_importance(layer: nn.Module, config, block: str) -> torch.Tensor:
    """Squared L2 norm of each structure's weights: its rows of Q, K, V (a KV group: every query
    head of the group, its K and V head) or of the FFN input projections, and its output-projection
    columns. (units,) float64, for the structures the layer still has."""
    arch, shape = architecture_for(config), model_shape(config)
    units = present_structures(layer, config, block)
    if not units:
        return torch.zeros(0, dtype=torch.float64)

    def row_norms(weight: torch.Tensor) -> torch.Tensor:  # (rows, d_in) -> (units,)
        return weight.double().square().sum(1).view(units, -1).sum(1)

    if block == ATTENTION:
        q_rows, kv_rows = units * shape.q_per_unit * shape.head_dim, units * shape.head_dim
        if arch.fused_qkv:
            inputs = weight_out_in(get_module(layer, arch.query)).split([q_rows, kv_rows, kv_rows])
        else:
            inputs = [weight_out_in(get_module(layer, path)) for path in (arch.query, arch.key, arch.value)]
    else:
        inputs = [weight_out_in(get_module(layer, path)) for path in arch.ffn_inputs]
    out = weight_out_in(output_projection(layer, config, block))  # (d_model, units * width)
    return sum(row_norms(w) for w in inputs) + row_norms(out.T)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ascending."""
    return sorted(torch.topk(scores, k).indices.tolist()) if k else []


def removed_share(scores: torch.Tensor, levels: list[int], relative: bool) -> list[float]:
    """Per level k, the sum of all but the k largest scores (over the total if `relative`)."""
    ordered = scores.sort(descending=True).values
    kept = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])  # kept[k]: sum of the top k
    total = float(kept[-1])
    removed = [max(0.0, total - float(kept[k])) for k in levels]
    return [r / total if total > 0 else 0.0 for r in removed] if relative else removed


# --- block influence (ShortGPT) --------------------------------------------------------------------


def block_influence(model: nn.Module, batches: list[dict]) -> list[float]:
    """BI_l = 1 - mean cos(x_l, x_{l+1}) over real tokens (ShortGPT eq. 1), per layer."""
    inputs, scores = capture_inputs(model, batches), []
    for layer in model_layers(model):
        outputs = propagate(layer, inputs)
        cos = torch.cat([F.cosine_similarity(a.hidden[a.tokens].double(), b.hidden[b.tokens].double(), dim=-1)
                         for a, b in zip(inputs, outputs)])
        scores.append(1.0 - float(cos.mean()))
        inputs = outputs
    return scores


# --- Fisher information of the masks (Kwon §3): see fisher.py -------------------------------------


def rearrange(fisher: torch.Tensor, kept: int) -> list[int]:
    """Kwon Alg. 2: which `kept` structures to keep, given the block's Fisher (n, n) = Σ_s g gᵀ.
    Starts from pruning the n - kept of least diagonal Fisher; each remaining structure in turn joins
    the pruned set P, then the member whose removal minimises 1_Pᵀ F 1_P (the Fisher estimate of the
    loss increase) leaves it. Never worse than the diagonal choice."""
    n = len(fisher)
    if kept in (0, n):
        return list(range(kept))
    order = fisher.diagonal().argsort().tolist()  # least important first
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[order[: n - kept]] = True
    column_sum = fisher[:, pruned].sum(1)  # F 1_P
    for index in order[n - kept:]:
        pruned[index] = True
        column_sum += fisher[:, index]
        # 1_{P\i}ᵀ F 1_{P\i} = 1_Pᵀ F 1_P - 2 (F 1_P)_i + F_ii, for every i in P
        leave = int((fisher.diagonal() - 2 * column_sum).masked_fill(~pruned, math.inf).argmin())
        pruned[leave] = False
        column_sum -= fisher[:, leave]
    return (~pruned).nonzero().squeeze(1).tolist()


# --- mask tuning (Kwon §4.3) -------------------------------------------------------------------------


def mask_normal_equations(xx: torch.Tensor, xt: torch.Tensor, weight: torch.Tensor,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal equations (G, b) of min_m ||Σ_u m_u x_u W_uᵀ - t||² over structures u of `width`
    columns, from xx = xᵀx (d_in, d_in) and xt = xᵀt (d_in, d_out) summed over tokens, and the
    weight (d_out, d_in); no (tokens·d_out, units) design matrix:
    G_uv = Σ_{a∈u, c∈v} (xᵀx)_ac (WᵀW)_ac,  b_u = Σ_{a∈u} (xᵀt W)_aa."""
    weight = weight.double()
    units = weight.shape[1] // width
    gram = (xx * (weight.T @ weight)).view(units, width, units, width).sum((1, 3))
    rhs = (xt * weight.T).sum(1).view(units, width).sum(1)
    return gram, rhs


def solve_mask(gram: torch.Tensor, rhs: torch.Tensor, dampening: float = MASK_DAMPENING) -> torch.Tensor | None:
    """m = 1 + Δ, (G + λ·mean(diag G)·I) Δ = b - G 1: least squares damped towards the untuned mask,
    so a structure the data cannot tell apart (a dead neuron) keeps 1. None when the solve fails or
    leaves ±MAX_MASK (Kwon's guard)."""
    ridge = dampening * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    ones = torch.ones_like(rhs)
    try:
        mask = ones + torch.linalg.solve(gram + ridge, rhs - gram @ ones)
    except RuntimeError:  # singular even with damping: G = 0, the block sees no input
        return None
    return mask if torch.isfinite(mask).all() and mask.abs().max() <= MAX_MASK else None


def block_sums(layer: nn.Module, config, batch: LayerInput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each block still present: (x, s) at real tokens, where x (tokens, d_in) is its output
    projection's input and s (tokens, d_model) = projection output + the residual it is added to,
    the sum a post-norm LayerNorm or the next block sees."""
    arch, seen, tokens = architecture_for(config), {}, batch.tokens

    def keep(name):
        def hook(module, args, out=None):  # a forward hook, or a pre-hook (no output)
            seen[name] = (args[0][tokens], None if out is None else out[tokens])
        return hook

    projections = {b: m for b in BLOCKS if (m := output_projection(layer, config, b)) is not None}
    handles = [module.register_forward_hook(keep(block)) for block, module in projections.items()]
    if FFN in projections and not arch.pre_norm:
        # post-norm: the FFN's residual is the attention block's output, which is also the FFN's input
        handles.append(get_module(layer, arch.ffn_inputs[0]).register_forward_pre_hook(keep("ffn_in")))
    try:
        run_layer(layer, batch)
    finally:
        for handle in handles:
            handle.remove()
    x_layer, sums = batch.hidden[tokens], {}
    if ATTENTION in seen:
        sums[ATTENTION] = (seen[ATTENTION][0], seen[ATTENTION][1] + x_layer)
    if FFN in seen:
        attention_out = seen[ATTENTION][1] if ATTENTION in seen else 0.0
        residual = x_layer + attention_out if arch.pre_norm else seen["ffn_in"][0]
        sums[FFN] = (seen[FFN][0], seen[FFN][1] + residual)
    return sums


def tune_masks(dense: nn.Module, pruned: nn.Module, inputs: list[LayerInput]) -> None:
    """Kwon §4.3, layer by layer, attention then FFN: least-squares mask values of each kept block's
    structures so that its sum on the pruned model's inputs reproduces the dense model's on the
    dense inputs; folded into the output projection's columns of `pruned`, in place."""
    config, shape = dense.config, model_shape(dense.config)
    teacher_in, student_in = inputs, inputs
    for idx, (teacher, student) in enumerate(zip(model_layers(dense), model_layers(pruned))):
        targets = [{b: s for b, (_, s) in block_sums(teacher, config, batch).items()} for batch in teacher_in]
        for block in BLOCKS:
            projection = output_projection(student, config, block)
            if projection is None:
                continue
            weight, xx, xt = weight_out_in(projection), 0.0, 0.0
            for batch, target in zip(student_in, targets):
                x, current = block_sums(student, config, batch)[block]
                # current - W x is everything but the masked term: residual and bias
                want = target[block] - (current - x @ weight.T)
                x = x.double()
                xx, xt = xx + x.T @ x, xt + x.T @ want.double()
            gram, rhs = mask_normal_equations(xx, xt, weight, unit_width(shape, block))
            mask = solve_mask(gram, rhs)
            if mask is None:
                log.warning("layer %d %s: mask tuning ill-posed, left untuned", idx, block)
                continue
            log.debug("layer %d %s: mask values in [%.3f, %.3f]", idx, block, mask.min(), mask.max())
            with torch.no_grad():
                weight.mul_(mask.repeat_interleave(unit_width(shape, block)).to(weight.dtype))
        teacher_in, student_in = propagate(teacher, teacher_in), propagate(student, student_in)


# --- the planner ------------------------------------------------------------------------------------


class StructurePlanner:
    """A baseline on ZipLM's table and budgets: kept counts per block by the method's rule, the method's
    choice of structures, then surgery on a copy of the model (which is never modified). The model is
    the dense one, or for gradual pruning (GMP* with --method magnitude) a pruned one that keeps `base`
    of the dense model: importances are then those of the current weights, every block keeps at most
    what it has, and plans are composed into the dense model's indices. Each method is a subclass;
    its importances are computed once, when it is made."""

    method = ""

    @classmethod
    def prepare(cls, loaded: LoadedModel, table: LatencyTable, calibration: Calibration, settings,
                score_loss=None, base: PruningPlan | None = None) -> StructurePlanner:
        """The method's planner (planners.planner_for), its importances computed; `base`: what
        `loaded.model` keeps of the dense model, when it is already pruned. Scores are the method's own."""
        started = time.perf_counter()
        where = "" if base is None else f"on the current model ({count_parameters(loaded.model):,} parameters)"
        with stage(f"{cls.method} baseline", where):
            planner = cls(loaded, table, calibration, settings.seed, base)
        planner.seconds = time.perf_counter() - started
        return planner

    def metadata(self) -> dict:
        return {"baseline_setup_seconds": round(self.seconds, 2)}

    def __init__(self, loaded: LoadedModel, table: LatencyTable, base: PruningPlan | None = None):
        self.loaded, self.table = loaded, table
        self.shape = loaded.shape
        table.check_compatible(self.shape, source="latency table")
        self.base = base or PruningPlan.dense(self.shape)
        if any(layer.query_heads is not None for layer in self.base.layers):
            raise UserError(f"{self.method} prunes whole KV groups: it cannot continue from a model with query heads "
                            "removed inside groups")
        self.present = [{ATTENTION: len(layer.attention), FFN: len(layer.ffn)} for layer in self.base.layers]

    def build(self, budget_ms: float) -> tuple[nn.Module, PruningPlan, list[tuple[AttentionLevel, int]]]:
        """A pruned model whose predicted time fits budget_ms: (model, plan, kept levels per layer)."""
        block_budget = self.table.block_budget(budget_ms)
        if block_budget < 0:
            raise UserError(f"budget {budget_ms:g} ms is below the table's fixed part "
                            f"{self.table.from_block_sum(self.table.fixed_ms):g} ms")
        counts = self.counts(block_budget)
        kept = [{block: self.kept(i, block, k) for block, k in zip(BLOCKS, layer)} for i, layer in enumerate(counts)]
        model = copy.deepcopy(self.loaded.model)
        for idx, layer in enumerate(model_layers(model)):
            for block in BLOCKS:
                if len(kept[idx][block]) < self.present[idx][block]:
                    prune_block(layer, model.config, idx, block, self.structures(block, kept[idx][block]), weight=None)
        levels = self.table_levels(counts)
        log.info("%s: budget %.2f ms, predicted %.2f ms, kept %s", self.method, budget_ms, self.table.predict(levels),
                 counts)
        plan = self.base.compose([{b: self.structures(b, units) for b, units in layer.items()} for layer in kept])
        return self.finish(model), plan, levels

    def structures(self, block: str, units: list[int]) -> list[int]:
        """The structures surgery and plans name (query heads, neurons) of a block's units."""
        return unit_heads(units, self.shape.q_per_unit) if block == ATTENTION else units

    def table_levels(self, counts: list[tuple[int, int]]) -> list[tuple[AttentionLevel, int]]:
        return [(unit_level(self.shape, ATTENTION, a), f) for a, f in counts]

    def counts(self, block_budget: float) -> list[tuple[int, int]]:
        """(attention units, FFN neurons) kept per layer, within `block_budget` of block time."""
        raise NotImplementedError

    def kept(self, idx: int, block: str, k: int) -> list[int]:
        """Which k structures of a block stay, as ids into the current model."""
        return list(range(k)) if k in (0, self.present[idx][block]) else self.choose(idx, block, k)

    def choose(self, idx: int, block: str, k: int) -> list[int]:
        """The k most important structures."""
        return top_k(self.scores[idx][block], k)

    def finish(self, model: nn.Module) -> nn.Module:
        """The pruned model's last step (weights unchanged by default)."""
        return model

    def levels(self, idx: int, block: str) -> list[int]:
        """The table's levels a block may take: no more structures than it has."""
        return [k for k in unit_levels(self.table, block) if k <= self.present[idx][block]]

    def searched(self, block_budget: float, relative: bool) -> list[tuple[int, int]]:
        """Levels by the DP, each block's error the share (`relative`) or the sum of importance removed."""
        problem = []
        for idx, layer in enumerate(self.scores):
            for block in BLOCKS:
                levels = self.levels(idx, block)
                problem.append(BlockLevels(
                    f"layer{idx}.{block}", tuple(levels),
                    tuple(self.table.time(block, unit_level(self.shape, block, k)) for k in levels),
                    tuple(removed_share(layer[block], levels, relative=relative))))
        choice = solve_dp(problem, block_budget)
        counts = [b.levels[i] for b, i in zip(problem, choice)]
        return list(zip(counts[0::2], counts[1::2]))

    def block_time(self, counts: list[tuple[int, int]]) -> float:
        return self.table.block_sum(self.table_levels(counts)) - self.table.fixed_ms


class MagnitudePlanner(StructurePlanner):
    """Structured weight-norm pruning: levels by the DP with the share of squared norm removed."""

    method = "magnitude"

    def __init__(self, loaded: LoadedModel, table: LatencyTable, calibration: Calibration, seed: int = 0,
                 base: PruningPlan | None = None):
        super().__init__(loaded, table, base)
        config = loaded.model.config
        self.scores = [{b: magnitude_importance(layer, config, b) for b in BLOCKS} for layer in model_layers(loaded.model)]

    def counts(self, block_budget: float) -> list[tuple[int, int]]:
        return self.searched(block_budget, relative=True)


class UniformPlanner(MagnitudePlanner):
    """One keep ratio for every block, the largest that fits; structures by weight norm."""

    method = "uniform"

    def counts(self, block_budget: float) -> list[tuple[int, int]]:
        """The largest ratio r (scanned downwards) with each block at the table level nearest r x its
        dense size (never above what it has)."""
        grids = [(np.asarray(unit_levels(self.table, b)), total_units(self.shape, b)) for b in BLOCKS]
        ratios = {float(r) for r in np.linspace(0.0, 1.0, UNIFORM_GRID + 1)}
        ratios |= {level / total for levels, total in grids for level in levels.tolist()}
        # argmin takes the first minimum: ties go to the smaller level; r = 0 removes every block
        configs = dict.fromkeys(tuple(int(levels[np.argmin(np.abs(levels - r * total))]) for levels, total in grids)
                                for r in sorted(ratios, reverse=True))
        for a, f in configs:
            counts = [(min(a, has[ATTENTION]), min(f, has[FFN])) for has in self.present]
            if self.block_time(counts) <= block_budget:
                return counts
        raise AssertionError("removing every block always fits a non-negative block budget")


class LayerDropPlanner(StructurePlanner):
    """ShortGPT: whole layers dropped by increasing block influence until the model fits."""

    method = "layerdrop"

    def __init__(self, loaded: LoadedModel, table: LatencyTable, calibration: Calibration, seed: int = 0,
                 base: PruningPlan | None = None):
        super().__init__(loaded, table, base)
        self.influence = block_influence(loaded.model, calibration.batches())

    def counts(self, block_budget: float) -> list[tuple[int, int]]:
        counts = [(has[ATTENTION], has[FFN]) for has in self.present]
        for idx in np.argsort(self.influence, kind="stable"):
            if self.block_time(counts) <= block_budget:
                break
            counts[idx] = (0, 0)
        return counts


class KwonPlanner(StructurePlanner):
    """Kwon et al. 2022: Fisher of the masks, the DP on its diagonal (the estimate of the loss increase,
    comparable across blocks, so not normalised), mask rearrangement, least-squares mask tuning (toward
    the model being pruned: the dense one, or in gradual pruning the current one)."""

    method = "kwon"

    def __init__(self, loaded: LoadedModel, table: LatencyTable, calibration: Calibration, seed: int = 0,
                 base: PruningPlan | None = None):
        super().__init__(loaded, table, base)
        batches = calibration.batches()
        targets = fisher_targets(loaded.model, loaded.kind, batches, seed)
        units = {(idx, block): n for idx, layer in enumerate(model_layers(loaded.model)) for block in BLOCKS
                 if (n := present_structures(layer, loaded.model.config, block))}
        grads = mask_gradients(loaded.model, loaded.kind, batches, targets, units)  # (samples, units) per (layer, block)
        empty = torch.zeros(0, 0, dtype=torch.float64)  # a removed block
        self.fisher = [{b: (g.T @ g if (g := grads.get((i, b))) is not None else empty) for b in BLOCKS}
                       for i in range(self.shape.num_layers)]  # Σ_s g gᵀ
        self.scores = [{b: f.diagonal().clone() for b, f in layer.items()} for layer in self.fisher]
        self.inputs = capture_inputs(loaded.model, batches)

    def counts(self, block_budget: float) -> list[tuple[int, int]]:
        return self.searched(block_budget, relative=False)

    def choose(self, idx: int, block: str, k: int) -> list[int]:
        return rearrange(self.fisher[idx][block], k)

    def finish(self, model: nn.Module) -> nn.Module:
        tune_masks(self.loaded.model, model, self.inputs)
        return model
