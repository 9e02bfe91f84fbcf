"""The KV cache through transformers' public `Cache` API, never through an argument's name.

transformers 5.24 renamed the `past_key_values` argument of models, layers and attention to
`cache` (and the output field with it). Code that finds the cache by name passes it to nobody
and generates wrong tokens without an error; code that finds it by type (`Cache`) or by the
parameter annotated with it keeps working across such renames.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache


def is_cache(value: object) -> bool:
    return isinstance(value, Cache)


def find_cache(kwargs: dict) -> tuple[str, Cache] | tuple[None, None]:
    """The (name, cache) among a call's keyword arguments, whatever the argument is called."""
    return next(((name, value) for name, value in kwargs.items() if is_cache(value)), (None, None))


def without_cache(kwargs: dict) -> dict:
    """A call's keyword arguments with any KV cache dropped."""
    return {name: value for name, value in kwargs.items() if not is_cache(value)}


def cache_argument(module: nn.Module) -> str:
    """The name of the parameter through which `module.forward` takes a KV cache (its annotation
    names `Cache`). Deprecation shims wrap forwards; inspect.signature follows `__wrapped__`."""
    for name, parameter in inspect.signature(module.forward).parameters.items():
        annotation = parameter.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
        if "Cache" in text:
            return name
    raise TypeError(f"{type(module).__name__}.forward takes no KV cache")


def cache_from_tensors(tensors: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding `tensors`: layer 0's keys and values, then layer 1's, ...

    Plain layers even where the config has a sliding window (Mistral): a sliding layer trims what it
    keeps, plain ones hold everything, and the mask applies the window either way."""
    cache = DynamicCache()
    for layer, (keys, values) in enumerate(zip(tensors[0::2], tensors[1::2])):
        cache.update(keys, values, layer)
    return cache


def cache_tensors(cache: Cache) -> list[torch.Tensor]:
    """Every layer's keys and values, layer 0's first: (batch, kv_heads, tokens, head_dim) each."""
    return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
