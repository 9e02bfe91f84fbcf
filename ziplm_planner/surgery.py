"""Model surgery: physically remove attention units and FFN neurons, bypass whole blocks.

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
from transformers.pytorch_utils import Conv1D

from .adapters import ATTENTION, FFN, Architecture, Bypass, ModelShape, architecture_for, get_module, model_layers, model_shape, set_module
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


def prune_attention(layer: nn.Module, arch: Architecture, shape: ModelShape, kept: Sequence[int], layer_idx: int) -> None:
    """Keep attention units `kept` (indices into the layer's current units); none kept bypasses."""
    if not kept:
        bypass_block(layer, arch.attention_bypass, layer_idx)
        return
    q_rows = unit_rows(kept, shape.q_per_unit * shape.head_dim)
    kv_rows = unit_rows(kept, shape.head_dim)
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
    for attr in arch.head_count_attrs:
        setattr(attention, attr, len(kept) * shape.q_per_unit)
    for attr in arch.head_width_attrs:
        setattr(attention, attr, len(q_rows))


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

    attention: list[int]
    ffn: list[int]


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

    def kept_counts(self) -> list[tuple[int, int]]:
        """(attention units, FFN neurons) kept per layer."""
        return [(len(layer.attention), len(layer.ffn)) for layer in self.layers]

    def compose(self, kept: list[dict[str, list[int]]]) -> PruningPlan:
        """The plan of a model cut further from this one: `kept` holds, per layer and block, ids into
        the structures this plan keeps."""
        return PruningPlan(self.shape, [LayerPlan([layer.attention[i] for i in ids[ATTENTION]],
                                                  [layer.ffn[i] for i in ids[FFN]])
                                        for layer, ids in zip(self.layers, kept)])

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        try:
            shape = ModelShape(**data["shape"])
            layers = [LayerPlan(list(layer["attention"]), list(layer["ffn"])) for layer in data["layers"]]
        except (KeyError, TypeError) as err:
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


def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Remove from a dense model everything the plan does not keep, in place."""
    arch = architecture_for(model.config)
    shape = model_shape(model.config)
    if differences := shape.differences(plan.shape):
        raise UserError(f"pruning plan is for another model shape ({'; '.join(differences)})")
    for idx, (layer, kept) in enumerate(zip(model_layers(model), plan.layers)):
        if len(kept.attention) < shape.attention_units:
            prune_attention(layer, arch, shape, kept.attention, idx)
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


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
