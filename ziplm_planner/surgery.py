"""Model surgery: physically remove attention units and FFN neurons, bypass whole blocks
(the primitives are in modeling_ziplm.py, which members carry).

No masks: a removed structure's rows and columns are gone from the weight matrices, so the
pruned model is smaller and faster. Plans hold the kept structures of every layer as
indices into the dense model, which is all a pruned member needs to be rebuilt from the
original config (`rebuild_pruned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers.initialization import no_init_weights

from .adapters import ATTENTION, FFN, REMOVED_ATTENTION, AttentionLevel, ModelShape, architecture_for, model_layers, model_shape
from .errors import UserError
# the structure surgery lives in the file members carry, so that they load without this package
from .modeling_ziplm import prune_attention, prune_ffn, regular_groups, unit_heads


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
