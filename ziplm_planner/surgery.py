"""Model surgery: physically remove attention units and FFN neurons, bypass whole blocks.

No masks: a removed structure's rows and columns are gone from the weight matrices, so the
pruned model is smaller and faster. Plans hold the kept structures of every layer as
indices into the dense model, which is all a pruned member needs to be rebuilt from the
original config (`rebuild_pruned`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from .adapters import (ATTENTION, FFN, REMOVED_ATTENTION, Architecture, AttentionLevel, Bypass, ModelShape, architecture_for,
                       get_module, model_layers, model_shape, set_module)
from .errors import UserError
from .kvcache import find_cache


# --- primitives -----------------------------------------------------------------------------


def keep_out_features(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features `index` of a Linear or Conv1D, in place."""
    if isinstance(module, Conv1D):  # weight (in, out)
        module.weight = nn.Parameter(module.weight.data.index_select(1, index).clone())
        module.nf = len(index)
    else:  # weight (out, in)
        module.weight = nn.Parameter(module.weight.data.index_select(0, index).clone())
        module.out_features = len(index)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data.index_select(0, index).clone())


def keep_in_features(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features `index` of a Linear or Conv1D, in place."""
    if isinstance(module, Conv1D):
        module.weight = nn.Parameter(module.weight.data.index_select(0, index).clone())
        module.nx = len(index)
    else:
        module.weight = nn.Parameter(module.weight.data.index_select(1, index).clone())
        module.in_features = len(index)


def unit_rows(units: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of `units` when each unit owns `width` consecutive rows."""
    units = torch.as_tensor(sorted(units), dtype=torch.long)
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def unit_heads(units: Sequence[int], per_unit: int) -> list[int]:
    """The query heads of attention units (KV groups) when each has `per_unit` of them."""
    return [u * per_unit + i for u in sorted(units) for i in range(per_unit)]


def regular_groups(heads: Sequence[int], per_unit: int) -> tuple[list[int], int]:
    """(KV groups, query heads kept in each) of a set of query heads; ValueError unless every group
    that keeps a head keeps as many (grouped-query attention repeats each KV head the same number
    of times)."""
    counts = Counter(h // per_unit for h in heads)
    if len(set(counts.values())) > 1:
        raise ValueError(f"query heads {sorted(heads)} keep different numbers of heads per KV group: {dict(counts)}")
    return sorted(counts), next(iter(counts.values()), 0)


# --- bypass modules ---------------------------------------------------------------------------


class SkipAttention(nn.Module):
    """Post-norm attention removed with its LayerNorm: the layer input passes through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


class ResidualOutput(nn.Module):
    """Post-norm FFN output removed with its LayerNorm: returns the residual input."""

    def forward(self, hidden_states, input_tensor):
        return input_tensor


class ZeroAttention(nn.Module):
    """Pre-norm attention removed: adds nothing to the residual stream.

    A KV cache still gets a one-scalar-per-token entry for this layer: caches read their
    length from a layer's keys (layer 0's by default), and an empty tensor counts as empty.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        _, cache = find_cache(kwargs)
        if cache is not None:
            batch, seq = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return hidden_states.new_zeros(()), None


class ZeroMLP(nn.Module):
    """Pre-norm MLP removed: adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return hidden_states.new_zeros(())


def _bypass_module(kind: Bypass, layer_idx: int) -> nn.Module:
    return {
        Bypass.IDENTITY: nn.Identity,
        Bypass.SKIP_ATTENTION: SkipAttention,
        Bypass.RESIDUAL_OUTPUT: ResidualOutput,
        Bypass.ZERO_MLP: ZeroMLP,
    }.get(kind, lambda: ZeroAttention(layer_idx))()


def bypass_block(layer: nn.Module, replacements: Sequence[tuple[str, Bypass]], layer_idx: int) -> None:
    for path, kind in replacements:
        set_module(layer, path, _bypass_module(kind, layer_idx))


# --- structures -------------------------------------------------------------------------------


def group_heads(layer: nn.Module, arch: Architecture, shape: ModelShape) -> int:
    """Query heads per KV group in a layer as it is now (fewer than the config's once pruned)."""
    if arch.fused_qkv:  # GPT-2: one query head per key head
        return shape.q_per_unit
    return get_module(layer, arch.query).weight.shape[0] // get_module(layer, arch.key).weight.shape[0]


def prune_attention(layer: nn.Module, arch: Architecture, shape: ModelShape, kept: Sequence[int], layer_idx: int) -> None:
    """Keep query heads `kept` (indices into the layer's current query heads) and the KV groups they
    read; every kept group keeps as many heads. None kept bypasses the block."""
    if not kept:
        bypass_block(layer, arch.attention_bypass, layer_idx)
        return
    groups, per_group = regular_groups(kept, group_heads(layer, arch, shape))
    q_rows = unit_rows(kept, shape.head_dim)
    kv_rows = unit_rows(groups, shape.head_dim)
    if arch.fused_qkv:
        fused = get_module(layer, arch.query)
        width = (fused.nf if isinstance(fused, Conv1D) else fused.out_features) // 3
        keep_out_features(fused, torch.cat([q_rows, width + kv_rows, 2 * width + kv_rows]))
    else:
        keep_out_features(get_module(layer, arch.query), q_rows)
        keep_out_features(get_module(layer, arch.key), kv_rows)
        keep_out_features(get_module(layer, arch.value), kv_rows)
    keep_in_features(get_module(layer, arch.attention_output), q_rows)
    attention = get_module(layer, arch.attention)
    for attrs, value in ((arch.head_count_attrs, len(kept)), (arch.head_width_attrs, len(q_rows)),
                         (arch.group_heads_attrs, per_group)):
        for attr in attrs:
            setattr(attention, attr, value)


def prune_ffn(layer: nn.Module, arch: Architecture, kept: Sequence[int], layer_idx: int) -> None:
    """Keep FFN neurons `kept` (indices into the layer's current neurons); none kept bypasses."""
    if not kept:
        bypass_block(layer, arch.ffn_bypass, layer_idx)
        return
    index = torch.as_tensor(sorted(kept), dtype=torch.long)
    for path in arch.ffn_inputs:
        keep_out_features(get_module(layer, path), index)
    keep_in_features(get_module(layer, arch.ffn_output), index)
    for path, attr in arch.ffn_width_attrs:
        setattr(get_module(layer, path), attr, len(index))


# --- plans ------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """Kept structures of one layer, as indices into the dense layer; empty = block removed."""

    attention: list[int]  # KV groups (attention units)
    ffn: list[int]
    query_heads: list[int] | None = None  # query heads kept, when not every head of the kept groups

    @classmethod
    def of_heads(cls, shape: ModelShape, heads: Sequence[int], ffn: Sequence[int]) -> LayerPlan:
        """The plan keeping query heads `heads` (dense ids) and FFN neurons `ffn`."""
        groups, per_group = regular_groups(heads, shape.q_per_unit)
        return cls(groups, sorted(ffn), sorted(heads) if groups and per_group < shape.q_per_unit else None)

    @classmethod
    def first(cls, shape: ModelShape, attention: AttentionLevel, ffn: int) -> LayerPlan:
        """The first structures of each kind: the shape of a candidate the profiler times."""
        heads = [g * shape.q_per_unit + i for g in range(attention.groups) for i in range(attention.heads)]
        return cls.of_heads(shape, heads, range(ffn))

    def heads(self, shape: ModelShape) -> list[int]:
        """Query heads kept (dense ids)."""
        return unit_heads(self.attention, shape.q_per_unit) if self.query_heads is None else sorted(self.query_heads)

    def attention_level(self, shape: ModelShape) -> AttentionLevel:
        if not self.attention:
            return REMOVED_ATTENTION
        return AttentionLevel(len(self.attention), len(self.heads(shape)) // len(self.attention))


@dataclass
class PruningPlan:
    """What a pruned model keeps, layer by layer: enough to rebuild it from the dense config."""

    shape: ModelShape
    layers: list[LayerPlan] = field(default_factory=list)

    @classmethod
    def dense(cls, shape: ModelShape) -> PruningPlan:
        return cls(shape, [
            LayerPlan(list(range(shape.attention_units)), list(range(shape.intermediate_size)))
            for _ in range(shape.num_layers)
        ])

    def kept_counts(self) -> list[tuple[AttentionLevel, int]]:
        """(attention level, FFN neurons) kept per layer."""
        return [(layer.attention_level(self.shape), len(layer.ffn)) for layer in self.layers]

    def compose(self, kept: list[dict[str, list[int]]]) -> PruningPlan:
        """The plan of a model cut further from this one: `kept` holds, per layer, ids into the query
        heads (ATTENTION) and the FFN neurons this plan keeps."""
        return PruningPlan(self.shape, [
            LayerPlan.of_heads(self.shape, [heads[i] for i in ids[ATTENTION]], [layer.ffn[i] for i in ids[FFN]])
            for layer, heads, ids in zip(self.layers, (layer.heads(self.shape) for layer in self.layers), kept)])

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        try:
            shape = ModelShape(**data["shape"])
            layers = [LayerPlan(list(layer["attention"]), list(layer["ffn"]),
                                None if layer.get("query_heads") is None else list(layer["query_heads"]))
                      for layer in data["layers"]]
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"not a pruning plan ({err}): expected the pruning.json written by ziplm-planner") from None
        plan = cls(shape, layers)
        plan.validate()
        return plan

    def validate(self) -> None:
        if len(self.layers) != self.shape.num_layers:
            raise UserError(f"pruning plan has {len(self.layers)} layers, its shape says {self.shape.num_layers}")
        for i, layer in enumerate(self.layers):
            for name, kept, total in (("attention", layer.attention, self.shape.attention_units),
                                      ("ffn", layer.ffn, self.shape.intermediate_size)):
                if len(set(kept)) != len(kept) or any(not 0 <= k < total for k in kept):
                    raise UserError(f"pruning plan layer {i} {name}: indices must be distinct and in [0, {total})")
            if layer.query_heads is not None:
                self._validate_heads(i, layer)

    def _validate_heads(self, i: int, layer: LayerPlan) -> None:
        heads, total = layer.query_heads, self.shape.num_heads
        if len(set(heads)) != len(heads) or any(not (_is_index(h) and 0 <= h < total) for h in heads):
            raise UserError(f"pruning plan layer {i} query_heads: indices must be distinct and in [0, {total})")
        try:
            groups, _ = regular_groups(heads, self.shape.q_per_unit)
        except ValueError as err:
            raise UserError(f"pruning plan layer {i}: {err}") from None
        if groups != sorted(layer.attention):
            raise UserError(f"pruning plan layer {i}: query_heads belong to KV groups {groups}, "
                            f"attention keeps {sorted(layer.attention)}")


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove from a dense model everything the plan does not keep, in place."""
    arch = architecture_for(model.config)
    shape = model_shape(model.config)
    if differences := shape.differences(plan.shape):
        raise UserError(f"pruning plan is for another model shape ({'; '.join(differences)})")
    for idx, (layer, kept) in enumerate(zip(model_layers(model), plan.layers)):
        if kept.attention_level(shape) != shape.full_attention:
            prune_attention(layer, arch, shape, kept.heads(shape), idx)
        if len(kept.ffn) < shape.intermediate_size:
            prune_ffn(layer, arch, kept.ffn, idx)
    return model


def build_pruned(model_class, config, plan: PruningPlan, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a pruned model: dense architecture from the original config, the recorded
    surgery, then its weights (configs validate hidden_size % heads, so a pruned config
    cannot describe the model by itself)."""
    with no_init_weights():
        model = model_class._from_config(config)
    model.tie_weights()  # skipped under no_init_weights: tied embeddings would load as two copies
    apply_plan(model, plan)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
