"""Pruned transformers models: the structure surgery of ziplm-planner, and the classes that rebuild a
pruned member with nothing but torch and transformers.

This file is copied as it is into every member folder whose layers differ in size, and named in its
config.json's `auto_map`, so that `AutoModel...from_pretrained(member, trust_remote_code=True)` loads
it without ziplm-planner. It must import nothing but torch and transformers.

A member's config.json is its dense model's, plus per layer the query heads, KV heads and FFN
neurons it keeps (0: the block is removed) and `ziplm_layout`, where its architecture keeps the
projections those sizes apply to. `Pruned<Class>` (any transformers model class, made on first use)
builds the dense model, removes what the sizes do not keep, then loads the member's weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import cache
from types import SimpleNamespace

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

PER_LAYER = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer")
LAYOUT = "ziplm_layout"

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


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# --- what a removed block becomes -----------------------------------------------------------------


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
    The cache is found by its type, whatever the argument is called (transformers 5.24 renamed it).
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
        if cache is not None:
            batch, seq = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(batch, 1, seq, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return hidden_states.new_zeros(()), None


class ZeroMLP(nn.Module):
    """Pre-norm MLP removed: adds nothing to the residual stream."""

    def forward(self, hidden_states):
        return hidden_states.new_zeros(())


BYPASS_MODULES = {"identity": lambda idx: nn.Identity(), "skip_attention": lambda idx: SkipAttention(),
                  "residual_output": lambda idx: ResidualOutput(), "zero_attention": ZeroAttention,
                  "zero_mlp": lambda idx: ZeroMLP()}


def bypass_block(layer: nn.Module, replacements: Sequence[tuple[str, object]], layer_idx: int) -> None:
    """Replace a removed block's modules; a kind is named by its string (or an enum whose value it is)."""
    for path, kind in replacements:
        set_module(layer, path, BYPASS_MODULES[getattr(kind, "value", kind)](layer_idx))


# --- structures -------------------------------------------------------------------------------
# `arch` says where a layer keeps its projections (ziplm_planner's Architecture, or a member's
# ziplm_layout); `shape` gives head_dim and q_per_unit (query heads per KV group) of the dense model.


def group_heads(layer: nn.Module, arch, shape) -> int:
    """Query heads per KV group in a layer as it is now (fewer than the config's once pruned)."""
    if arch.fused_qkv:  # GPT-2: one query head per key head
        return shape.q_per_unit
    return get_module(layer, arch.query).weight.shape[0] // get_module(layer, arch.key).weight.shape[0]


def prune_attention(layer: nn.Module, arch, shape, kept: Sequence[int], layer_idx: int) -> None:
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


def prune_ffn(layer: nn.Module, arch, kept: Sequence[int], layer_idx: int) -> None:
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


# --- a member rebuilt from its config ----------------------------------------------------------------


def shrink_to_config(model: nn.Module, config) -> None:
    """Resize a model built at its dense size to the sizes its config lists per layer (its weights are
    loaded after): the first heads of the first KV groups, the first neurons, since the member's
    weights hold the kept ones, in order."""
    layout = SimpleNamespace(**getattr(config, LAYOUT))
    layers = get_module(model.base_model, layout.layers)
    sizes = zip(*(getattr(config, name) for name in PER_LAYER))
    for idx, (layer, (heads, kv_heads, neurons)) in enumerate(zip(layers, sizes)):
        if heads < layout.num_heads:
            per_group = heads // kv_heads if kv_heads else 0
            prune_attention(layer, layout, layout, [g * layout.q_per_unit + i for g in range(kv_heads)
                                                    for i in range(per_group)], idx)
        if neurons < layout.intermediate_size:
            prune_ffn(layer, layout, range(neurons), idx)


@cache
def pruned_class(base: type) -> type:
    """`base` (a transformers model class) made at the sizes of its config's layers."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        shrink_to_config(self, config)

    return type(f"Pruned{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str) -> type:
    """`Pruned<Class>` for any transformers model class, as config.json's auto_map names it."""
    base = getattr(transformers, name.removeprefix("Pruned"), None) if name.startswith("Pruned") else None
    if not (isinstance(base, type) and issubclass(base, transformers.PreTrainedModel)):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return pruned_class(base)
