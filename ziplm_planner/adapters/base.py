"""Model families as data: where the prunable structures of a layer live.

One frozen `Architecture` per family says which modules hold the attention projections,
the FFN projections and what replaces a block when it is removed entirely. Everything that
acts on a model (surgery, calibration hooks, profiling) reads these fields; no code outside
the adapters knows a module name.

Structures:
- attention unit: one head, or for grouped-query attention one KV group = its K and V heads
  plus every query head that shares them. A unit owns `q_per_unit * head_dim` rows of Q and
  columns of the output projection, and `head_dim` rows of K and V.
- query head inside a KV group: `head_dim` rows of Q and columns of the output projection. Query
  heads are removed one from every kept group at once, so every kept group keeps as many and the
  layer stays regular grouped-query attention (`AttentionLevel`).
- FFN neuron: a row of each input projection (fc1, or gate and up) and a column of the output
  projection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


ATTENTION, FFN = "attention", "ffn"  # the two prunable blocks of every layer
BLOCKS = (ATTENTION, FFN)


class Bypass(enum.Enum):
    """What a module becomes when its block is removed entirely."""

    IDENTITY = "identity"  # norms and FFN inputs: pass the hidden state through
    SKIP_ATTENTION = "skip_attention"  # post-norm attention (with its LayerNorm): return the input
    RESIDUAL_OUTPUT = "residual_output"  # post-norm FFN output (dense + LayerNorm): return the residual
    ZERO_ATTENTION = "zero_attention"  # pre-norm attention: add nothing to the residual stream
    ZERO_MLP = "zero_mlp"  # pre-norm MLP: add nothing to the residual stream


class AttentionLevel(NamedTuple):
    """The size of one layer's attention: KV groups kept, and query heads kept in each of them.
    Without grouped-query attention every group is one head, and `heads` is 1."""

    groups: int
    heads: int

    @property
    def query_heads(self) -> int:
        return self.groups * self.heads

    def __str__(self) -> str:
        return f"{self.groups}x{self.heads}"


REMOVED_ATTENTION = AttentionLevel(0, 0)


def removed_level(block: str) -> AttentionLevel | int:
    """A block's level once it is removed."""
    return REMOVED_ATTENTION if block == ATTENTION else 0


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its layers and prunable projections (paths relative to a layer)."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # path from the base model (`model.base_model`) to the ModuleList of layers
    attention: str  # the module whose head-count attributes change after surgery
    query: str
    key: str
    value: str
    attention_output: str
    ffn_inputs: tuple[str, ...]
    ffn_output: str
    attention_bypass: tuple[tuple[str, Bypass], ...]
    ffn_bypass: tuple[tuple[str, Bypass], ...]
    pre_norm: bool  # a zeroed block leaves the residual stream untouched (no norm after it)
    fused_qkv: bool = False  # query, key and value are one projection, in that order
    head_count_attrs: tuple[str, ...] = ()  # attention attributes set to the kept query-head count
    head_width_attrs: tuple[str, ...] = ()  # attention attributes set to kept query heads * head_dim
    group_heads_attrs: tuple[str, ...] = ()  # attention attributes set to kept query heads per KV group
    ffn_width_attrs: tuple[tuple[str, str], ...] = ()  # (module path, attribute) set to kept neurons
    # config field aliases, normalised in `ModelShape.from_config`
    config_layers: str = "num_hidden_layers"
    config_heads: str = "num_attention_heads"
    config_kv_heads: str | None = None
    config_intermediate: str = "intermediate_size"


@dataclass(frozen=True)
class ModelShape:
    """The dense shape a plan, a table or a level database is made for."""

    model_type: str
    num_layers: int
    hidden_size: int
    attention_units: int  # heads, or KV groups under grouped-query attention
    q_per_unit: int  # query heads per unit (1 without GQA)
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @property
    def num_heads(self) -> int:
        return self.attention_units * self.q_per_unit

    @property
    def full_attention(self) -> AttentionLevel:
        return self.whole_groups(self.attention_units)

    @property
    def dense_kept(self) -> list[tuple[AttentionLevel, int]]:
        """(attention level, FFN neurons) of every layer of the dense model, as the table's kept counts."""
        return [(self.full_attention, self.intermediate_size)] * self.num_layers

    def whole_groups(self, groups: int) -> AttentionLevel:
        """The attention level keeping `groups` KV groups with all their query heads."""
        return AttentionLevel(groups, self.q_per_unit) if groups else REMOVED_ATTENTION

    def full_level(self, block: str) -> AttentionLevel | int:
        """A block's level with nothing removed."""
        return self.full_attention if block == ATTENTION else self.intermediate_size

    def structures(self, block: str) -> int:
        """How many structures a dense block has: query heads, or FFN neurons."""
        return self.num_heads if block == ATTENTION else self.intermediate_size

    def differences(self, other: ModelShape) -> list[str]:
        """Fields that differ, as 'name: mine != theirs'."""
        return [
            f"{name}: {mine} != {theirs}"
            for name, mine, theirs in (
                (f, getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__
            )
            if mine != theirs
        ]


# the same two helpers are in modeling_ziplm.py, which members carry and which may import nothing of this package
def get_module(root, path: str):
    return root.get_submodule(path)


def set_module(root, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
