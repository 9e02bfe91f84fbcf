"""Registry of model families, keyed by `config.model_type`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from .base import (ATTENTION, BLOCKS, FFN, REMOVED_ATTENTION, Architecture, AttentionLevel, Bypass, ModelShape, get_module,
                   removed_level, set_module)
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLAMA

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES: tuple[Architecture, ...] = (BERT, LLAMA, GPT2)
_BY_MODEL_TYPE = {t: arch for arch in ARCHITECTURES for t in arch.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def architecture_for(config) -> Architecture:
    arch = _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    if arch is None:
        raise UserError(
            f"unsupported architecture {getattr(config, 'model_type', None)!r}: "
            f"supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return arch


def model_shape(config) -> ModelShape:
    """The dense shape of a model, with each family's config names normalised here only."""
    arch = architecture_for(config)
    hidden = config.hidden_size
    heads = getattr(config, arch.config_heads)
    kv_heads = getattr(config, arch.config_kv_heads, None) if arch.config_kv_heads else None
    kv_heads = kv_heads or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, arch.config_intermediate, None) or 4 * hidden
    return ModelShape(
        model_type=config.model_type,
        num_layers=getattr(config, arch.config_layers),
        hidden_size=hidden,
        attention_units=kv_heads,
        q_per_unit=heads // kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=config.vocab_size,
    )


def model_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder or decoder layers of any supported model, with or without a task head."""
    arch = architecture_for(model.config)
    return get_module(model.base_model, arch.layers)


__all__ = [
    "ATTENTION",
    "BLOCKS",
    "FFN",
    "REMOVED_ATTENTION",
    "ARCHITECTURES",
    "Architecture",
    "AttentionLevel",
    "Bypass",
    "ModelShape",
    "SUPPORTED_MODEL_TYPES",
    "architecture_for",
    "get_module",
    "model_layers",
    "model_shape",
    "removed_level",
    "set_module",
]
