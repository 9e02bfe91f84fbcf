"""Empirical Fisher information of masks on the model's structures, at mask = 1.

A mask variable multiplies columns of a block's output-projection input (a head's output, a
neuron's activation; or all of them, for a whole block), one per sample, so one backward pass of
the summed per-sample losses gives every per-sample gradient g = dL_s/dm. Σ_s g gᵀ is the Fisher:
½ vᵀ F v estimates the loss increase of moving the masks by v (Kwon et al. 2022, §3). Kwon's
baseline uses it per structure; ZipLM uses it per block to put every block's OBS errors in loss
units (`block_fisher`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import BLOCKS, model_layers
from .calibrate import mean_pool
from .layers import output_projection
from .models import CAUSAL_LM, CLASSIFICATION

TARGET_NOISE = 0.1  # embedding Fisher: std of the sampled target around the dense embedding, x its norm


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


def fisher_targets(dense: nn.Module, kind: str, batches: list[dict], seed: int) -> list[torch.Tensor | None]:
    """What each sample's loss is measured against. Distances to the dense model's own output have
    zero gradient at the dense model, so targets are sampled from the model's predictive
    distribution (the true Fisher): a class drawn from its softmax when there are no labels, and for
    embeddings a Gaussian draw around the dense embedding. Causal LMs use their real next tokens."""
    if kind == CAUSAL_LM:
        return [None] * len(batches)
    generator, targets = torch.Generator().manual_seed(seed), []
    with torch.no_grad():  # not inference_mode: the targets enter an autograd graph later
        for batch in batches:
            if kind == CLASSIFICATION and "labels" in batch:
                targets.append(batch["labels"])
                continue
            out = dense(**{k: v for k, v in batch.items() if k != "labels"})
            if kind == CLASSIFICATION:
                targets.append(torch.multinomial(out.logits.float().softmax(-1), 1, generator=generator).squeeze(1))
            else:
                pooled = mean_pool(out.last_hidden_state, batch["attention_mask"])  # (batch, d)
                noise = torch.randn(pooled.shape, generator=generator, dtype=pooled.dtype)
                scale = TARGET_NOISE * pooled.norm(dim=-1, keepdim=True) / math.sqrt(pooled.shape[-1])
                targets.append(pooled + scale * noise)
    return targets


def per_sample_losses(model: nn.Module, kind: str, batch: dict, target) -> torch.Tensor:
    """(batch,) differentiable losses: mean next-token NLL over real tokens (causal LM), cross-entropy
    (classifier), cosine distance of the mean-pooled embedding (embedding model)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if kind == CAUSAL_LM:
        logits = model(**inputs, use_cache=False).logits
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
        logits = logits[:, :-1].transpose(1, 2).to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits, labels, reduction="none")  # (batch, seq - 1), 0 where -100
        return nll.sum(1) / (labels != -100).sum(1).clamp(min=1)
    out = model(**inputs)
    if kind == CLASSIFICATION:
        return F.cross_entropy(out.logits, target, reduction="none")
    return 1.0 - F.cosine_similarity(mean_pool(out.last_hidden_state, batch["attention_mask"]), target, dim=-1)


def mask_gradients(model: nn.Module, kind: str, batches: list[dict], targets: list,
                   units: dict[tuple[int, str], int]) -> dict[tuple[int, str], torch.Tensor]:
    """Per-sample gradients g = dL_s/dm at m = 1 of `units[(layer, block)]` masks per block: (samples,
    units) float64. Each sample has its own mask, so one backward of Σ_s L_s gives every per-sample
    gradient."""
    grads: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in units}
    dtype = next(model.parameters()).dtype
    for batch, target in zip(batches, targets):
        n = len(batch["input_ids"])
        masks = {key: torch.ones(n, width, dtype=dtype, requires_grad=True) for key, width in units.items()}
        with torch.enable_grad(), structure_masks(model, masks):
            losses = per_sample_losses(model, kind, batch, target)
            for key, grad in zip(masks, torch.autograd.grad(losses.sum(), list(masks.values()))):
                grads[key].append(grad)
    return {key: torch.cat(g).double() for key, g in grads.items()}




def block_fisher(model: nn.Module, kind: str, batches: list[dict], seed: int = 0) -> list[dict[str, float]]:
    """Per layer and block still present, F_b = Σ_s (dL_s/dα_b)² with α_b scaling the block's whole
    output-projection input: ½ F_b estimates the loss increase of removing the block. 0 for a block
    already removed."""
    present = {(idx, block) for idx, layer in enumerate(model_layers(model)) for block in BLOCKS
               if output_projection(layer, model.config, block) is not None}
    grads = mask_gradients(model, kind, batches, fisher_targets(model, kind, batches, seed),
                           dict.fromkeys(present, 1))
    return [{block: float(grads[idx, block].square().sum()) if (idx, block) in grads else 0.0 for block in BLOCKS}
            for idx in range(len(model_layers(model)))]
