"""One layer-by-layer driver for every model.

The inputs of the first layer are captured once with a hook (hidden states plus exactly the
keyword arguments the model passes its layers: masks, rotary embeddings, ...). After that,
every stage walks the layers itself: run a layer on the captured inputs with hooks on the
modules it needs, change the layer, and propagate to the next one. Model-specific code stays
in the adapters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import ATTENTION, BLOCKS, architecture_for, get_module, model_layers
from .kvcache import without_cache
from .obs import accumulate_hessian


class _Captured(Exception):
    pass


def arguments_by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by parameter name, **kwargs flattened in: some models pass the mask to their
    layers positionally (BERT's encoder), and a captured layer is called again as layer(hidden, **kwargs)."""
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
    return dict(bound)


def capture_first_layer_call(model: nn.Module, run: Callable[[], object]) -> tuple[torch.Tensor, dict]:
    """Hidden states and keyword arguments that `run()` (a forward of `model`) passes its first layer;
    the forward stops there."""
    captured = {}

    def hook(module, args, kwargs):
        arguments = arguments_by_name(module, args, kwargs)
        captured["hidden"] = arguments.pop(next(iter(inspect.signature(module.forward).parameters)))
        captured["kwargs"] = arguments
        raise _Captured

    handle = model_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            run()
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["hidden"].clone(), captured["kwargs"]


@dataclass
class LayerInput:
    """One calibration batch at the input of the current layer."""

    hidden: torch.Tensor  # (batch, seq, hidden)
    kwargs: dict
    tokens: torch.Tensor  # (batch, seq) bool: real tokens, never padding


def capture_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[LayerInput]:
    inputs = []
    for batch in batches:
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden, kwargs = capture_first_layer_call(model, lambda: model(**model_inputs))
        # A KV cache in the captured arguments would grow each time a layer runs on the batch, and
        # the next run would attend over stale keys: every run must see only this batch.
        kwargs = without_cache(kwargs)
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        inputs.append(LayerInput(hidden, kwargs, batch["attention_mask"].bool()))
    return inputs


def run_layer(layer: nn.Module, batch: LayerInput) -> torch.Tensor:
    with torch.inference_mode():
        out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out


def propagate(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """The inputs of the next layer: this layer's outputs on every batch."""
    return [LayerInput(run_layer(layer, batch), batch.kwargs, batch.tokens) for batch in inputs]


def output_projection(layer: nn.Module, model_config, block: str) -> nn.Module | None:
    """The module whose input columns are the block's structures; None if the block was removed."""
    arch = architecture_for(model_config)
    path = arch.attention_output if block == ATTENTION else arch.ffn_output
    try:
        return get_module(layer, path)
    except AttributeError:
        return None


def block_hessians(layer: nn.Module, model_config, inputs: list[LayerInput], blocks=BLOCKS) -> dict[str, torch.Tensor]:
    """H = 2 XᵀX / N of the inputs of each block's output projection, over real tokens only (padding
    never enters a Hessian)."""
    state: dict[str, tuple[torch.Tensor | None, int]] = {}
    for batch in inputs:
        for block, x in run_capturing(layer, model_config, batch, blocks)[1].items():
            state[block] = accumulate_hessian(x, *state.get(block, (None, 0)))
    return {block: hessian for block, (hessian, _) in state.items()}


def run_capturing(layer: nn.Module, model_config, batch: LayerInput,
                  blocks=BLOCKS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output on `batch`, and the (tokens, d_in) inputs of each block's output projection
    at the batch's real tokens (for the blocks the layer still has)."""
    seen = {}

    def hook_for(block):
        def hook(module, args):
            seen[block] = args[0][batch.tokens]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(block))
               for block in blocks if (module := output_projection(layer, model_config, block)) is not None]
    try:
        output = run_layer(layer, batch)
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


def cross_hessians(layer: nn.Module, model_config, block: str, inputs: list[LayerInput],
                   dense_inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, K) = (2 X̃ᵀX̃ / N, 2 X̃ᵀX / N): X̃ the block's projection inputs in `layer` on `inputs`, X
    (`dense_inputs`, per batch) those of the dense model's layer on the same samples."""
    hessian = cross = None
    count = 0
    for batch, dense_x in zip(inputs, dense_inputs):
        x = run_capturing(layer, model_config, batch, [block])[1][block]
        hessian, _ = accumulate_hessian(x, hessian, count)
        cross, count = accumulate_hessian(x, cross, count, dense_x)
    return hessian, cross


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (d_out, d_in), a view of the parameter (GPT-2's Conv1D stores (in, out))."""
    return module.weight.data.T if isinstance(module, Conv1D) else module.weight.data
