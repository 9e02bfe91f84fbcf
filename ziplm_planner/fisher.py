"""Empirical Fisher information of masks on the model's structures, at mask = 1.

A mask variable multiplies columns of a block's output-projection input (a head's output, a
neuron's activation; or all of them, for a whole block), one per sample, so one backward pass of
the summed per-sample losses gives every per-sample gradient g = dL_s/dm. Σ_s g gᵀ is the Fisher:
½ vᵀ F v estimates the loss increase of moving the masks by v (Kwon et al. 2022, §3). Kwon's
baseline uses it per structure; ZipLM uses it per block to put every block's OBS errors in loss
units (`block_fisher`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import BLOCKS, model_layers
from .kinds import ModelKind
from .layers import output_projection


@contextmanager
def structure_masks(model: nn.Module, masks: dict[tuple[int, str], torch.Tensor]) -> Iterator[None]:
    """Multiply each structure's output-projection input columns by its mask, per sample:
    masks[(layer, block)] is (batch, units), the input's columns split into `units` equal parts."""
    def hook_for(mask: torch.Tensor):
        def hook(module, args):
            width = args[0].shape[-1] // mask.shape[1]
            scale = mask.repeat_interleave(width, dim=1)[:, None, :]  # (batch, 1, units * width)
            return (args[0] * scale.to(args[0].dtype), *args[1:])
        return hook

    layers = model_layers(model)
    handles = [output_projection(layers[idx], model.config, block).register_forward_pre_hook(hook_for(mask))
               for (idx, block), mask in masks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def fisher_targets(dense: nn.Module, kind: ModelKind, batches: list[dict], seed: int) -> list[torch.Tensor | None]:
    """What each sample's loss is measured against (`ModelKind.fisher_target`). Distances to the dense
    model's own output have zero gradient at the dense model, so targets are sampled from the model's
    predictive distribution (the true Fisher): a class drawn from its softmax when there are no labels,
    and for embeddings a Gaussian draw around the dense embedding. Causal LMs use their real next tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # not inference_mode: the targets enter an autograd graph later
        return [kind.fisher_target(dense, batch, generator) for batch in batches]


def mask_gradients(model: nn.Module, kind: ModelKind, batches: list[dict], targets: list,
                   units: dict[tuple[int, str], int]) -> dict[tuple[int, str], torch.Tensor]:
    """Per-sample gradients g = dL_s/dm at m = 1 of `units[(layer, block)]` masks per block: (samples,
    units) float64. Each sample has its own mask, so one backward of Σ_s L_s gives every per-sample
    gradient."""
    if not units:  # every block already removed: nothing to differentiate
        return {}
    grads: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in units}
    dtype = next(model.parameters()).dtype
    for batch, target in zip(batches, targets):
        n = len(batch["input_ids"])
        masks = {key: torch.ones(n, width, dtype=dtype, requires_grad=True) for key, width in units.items()}
        with torch.enable_grad(), structure_masks(model, masks):
            losses = kind.fisher_losses(model, batch, target)  # (batch,)
            for key, grad in zip(masks, torch.autograd.grad(losses.sum(), list(masks.values()))):
                grads[key].append(grad)
    return {key: torch.cat(g).double() for key, g in grads.items()}


def block_fisher(model: nn.Module, kind: ModelKind, batches: list[dict], seed: int = 0) -> list[dict[str, float]]:
    """Per layer and block still present, F_b = Σ_s (dL_s/dα_b)² with α_b scaling the block's whole
    output-projection input: ½ F_b estimates the loss increase of removing the block. 0 for a block
    already removed."""
    present = {(idx, block) for idx, layer in enumerate(model_layers(model)) for block in BLOCKS
               if output_projection(layer, model.config, block) is not None}
    grads = mask_gradients(model, kind, batches, fisher_targets(model, kind, batches, seed),
                           dict.fromkeys(present, 1))
    return [{block: float(grads[idx, block].square().sum()) if (idx, block) in grads else 0.0 for block in BLOCKS}
            for idx in range(len(model_layers(model)))]
