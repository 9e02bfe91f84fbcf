"""Stitching: a pruned copy of a model with each block at its chosen level and its OBS-updated weights,
then the surgery that physically removes what the level drops."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapters import ATTENTION, BLOCKS, FFN, AttentionLevel, architecture_for, model_layers, model_shape
from .calibrate import Calibration
from .database import LevelDatabase, block_trace, column_width
from .layers import (LayerInput, block_hessians, capture_inputs, cross_hessians, output_projection, propagate,
                     run_capturing, weight_out_in)
from .obs import kept_columns, reconstruct_weights
from .progress import bar
from .surgery import LayerPlan, PruningPlan, prune_attention, prune_ffn


def prune_block(layer: nn.Module, config, idx: int, block: str, kept: list[int], weight: torch.Tensor | None,
                present: int | None = None) -> None:
    """Write the block's updated output-projection columns, then cut the block to `kept` (query heads or
    neurons, ids into the layer as it is), unless it keeps all `present` structures."""
    arch, shape = architecture_for(config), model_shape(config)
    if weight is not None:
        cols = kept_columns(kept, column_width(shape, block))
        weight_out_in(output_projection(layer, config, block))[:, cols] = weight
    if len(kept) == present:
        return
    if block == ATTENTION:
        prune_attention(layer, arch, shape, kept, idx)
    else:
        prune_ffn(layer, arch, kept, idx)


def stitch(base: nn.Module, db: LevelDatabase, counts: list[tuple[AttentionLevel, int]],
           correction: Calibration | None = None) -> tuple[nn.Module, PruningPlan]:
    """A pruned copy of `base`, the model `db` was built on: each block at its level, with OBS-updated
    weights. Returns the model and its plan in the dense model's indices.

    With `correction` data, the weights of every block still there are instead fit layer by layer,
    on the inputs of the model compressed so far, to `base`'s output on its own inputs (OBS with the
    cross term X̃ᵀX), so each layer corrects the error the layers before it left (Kwon et al.'s
    layer-wise reconstruction, in OBS form). The structures kept are the database's either way."""
    model, config = copy.deepcopy(base), base.config
    inputs = reference_inputs = capture_inputs(base, correction.batches()) if correction is not None else None
    layers = zip(model_layers(model), model_layers(base), db.current_ids(counts))
    for idx, (layer, reference, kept) in enumerate(bar(list(layers), desc="stitch", leave=False, disable=inputs is None)):
        if inputs is not None:  # one run of the reference layer: its blocks' inputs, and the next layer's
            runs = [run_capturing(reference, config, batch) for batch in reference_inputs]
            reference_inputs = [LayerInput(out, b.kwargs, b.tokens) for (out, _), b in zip(runs, reference_inputs)]
        for block, level in zip(BLOCKS, counts[idx]):
            trace = db.blocks[idx][block]
            if level == trace.levels[0] and inputs is None:  # the block as it is
                continue
            weight = None
            if level:
                dense = weight_out_in(output_projection(reference, config, block))
                if inputs is None:
                    weight = db.reconstructed(idx, block, dense, level)
                else:
                    hessian, cross = cross_hessians(layer, config, block, inputs, [seen[block] for _, seen in runs])
                    weight = reconstruct_weights(dense.double(), hessian, kept[block], column_width(db.shape, block),
                                                 db.dampening, cross).to(dense.dtype)
            prune_block(layer, config, idx, block, kept[block], weight, trace.present)
        if inputs is not None:
            inputs = propagate(layer, inputs)
    return model, db.plan(counts)


def stitch_sequential(dense: nn.Module, db: LevelDatabase, counts: list[tuple[AttentionLevel, int]],
                      calibration: Calibration) -> tuple[nn.Module, PruningPlan]:
    """Like `stitch`, but each block is re-pruned with a Hessian of inputs from the model compressed
    so far (attention before FFN within a layer), so later layers correct earlier errors."""
    model, config, shape = copy.deepcopy(dense), dense.config, db.shape
    inputs: list[LayerInput] = capture_inputs(model, calibration.batches())
    plan_layers = []
    for idx, layer in enumerate(bar(model_layers(model), desc="sequential stitch", leave=False)):
        kept_by_block = {}
        for block, level in zip(BLOCKS, counts[idx]):
            full = shape.full_level(block)
            kept = kept_by_block[block] = list(range(shape.structures(block)))
            if level == full:
                continue
            hessian, weight = block_hessians(layer, config, inputs, [block]).get(block), None
            kept = kept_by_block[block] = block_trace(layer, config, block, hessian, full, [level], db.dampening,
                                                      f"layer {idx} {block}").kept(level)
            if kept:
                current = weight_out_in(output_projection(layer, config, block))
                weight = reconstruct_weights(current.double(), hessian, kept, column_width(shape, block),
                                             db.dampening).to(current.dtype)
            prune_block(layer, config, idx, block, kept, weight)
        plan_layers.append(LayerPlan.of_heads(shape, kept_by_block[ATTENTION], kept_by_block[FFN]))
        inputs = propagate(layer, inputs)
    return model, PruningPlan(shape, plan_layers)
