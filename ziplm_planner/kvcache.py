"""The KV cache through transformers' public `Cache` API, never through an argument's name.

transformers 5.24 renamed the `past_key_values` argument of models, layers and attention to
`cache` (and the output field with it). Code that finds the cache by name passes it to nobody
and generates wrong tokens without an error; code that finds it by type (`Cache`) or by the
parameter annotated with it keeps working across such renames.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers.cache_utils import Cache


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
