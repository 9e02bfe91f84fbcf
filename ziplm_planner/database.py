"""The level database: for every layer and block, the structures greedy OBS keeps and the error at
every level the latency table has. Computed once, it serves every target.

Weights are not stored per level: greedy OBS with exact inverse-Hessian updates is a least-
squares solve for the removed set (obs.reconstruct_weights), so the Hessian and the kept
structures rebuild any level's weights on demand.

OBS errors are relative to each block's own output, which says nothing of how much that output
matters to the loss: a block whose output barely moves the residual stream looks as costly to cut
as one the model depends on. With `loss_scales` (the default, `--block-errors fisher`), each block's
errors are multiplied by its Fisher F_b (fisher.block_fisher), so a removed block costs the Fisher
estimate of the loss increase of removing it and the search compares blocks in loss units.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import (ATTENTION, BLOCKS, FFN, REMOVED_ATTENTION, AttentionLevel, ModelShape, model_layers, model_shape,
                       removed_level)
from .calibrate import Calibration
from .errors import UserError
from .fisher import block_fisher
from .kinds import ModelKind
from .layers import block_hessians, capture_inputs, output_projection, propagate, weight_out_in
from .obs import obs_prune, prune_heads_per_group, reconstruct_weights
from .progress import bar, stage
from .search import BlockLevels
from .surgery import PruningPlan, unit_heads
from .table import LatencyTable

log = logging.getLogger(__name__)

FORMAT = "ziplm-planner/level-database/v3"  # v3: query heads inside KV groups, kept structures per level
FISHER_FLOOR = 0.01  # x the mean block Fisher: a block whose gradient happened to vanish is not free to remove


def column_width(shape: ModelShape, block: str) -> int:
    """Output-projection input columns of one structure: a query head's, or a neuron's one."""
    return shape.head_dim if block == ATTENTION else 1


def fits(level: AttentionLevel | int, present: AttentionLevel | int) -> bool:
    """Whether a block that is at `present` can be cut to `level` (attention: in groups and in heads)."""
    if isinstance(level, AttentionLevel):
        return level == REMOVED_ATTENTION or (level.groups <= present.groups and level.heads <= present.heads)
    return level <= present


@dataclass
class BlockTrace:
    """One block of one layer: per level, the structures greedy OBS keeps and the relative output error.
    Structures are query heads for attention and neurons for the FFN, as ids into the layer as it is."""

    levels: list  # descending, from the block as it is to removed
    errors: list[float]
    kept_sets: list[list[int]]
    hessian: torch.Tensor  # (d_in, d_in) undamped, float32 on disk

    def kept(self, level) -> list[int]:
        return self.kept_sets[self.levels.index(level)]

    @property
    def present(self) -> int:
        """Structures the block has now."""
        return len(self.kept_sets[0])


def neuron_trace(weight: torch.Tensor, hessian: torch.Tensor, levels: list[int], dampening: float) -> BlockTrace:
    """Greedy OBS over FFN neurons, one at a time, from all down to 0."""
    trace = obs_prune(weight, hessian, 1, levels, dampening)
    total = weight.shape[1]
    kept = [sorted(set(range(total)) - set(trace.order[: total - level])) for level in trace.levels]
    return BlockTrace(trace.levels, trace.errors, kept, hessian)


def head_trace(weight: torch.Tensor, hessian: torch.Tensor, levels: list[AttentionLevel], present: AttentionLevel,
               head_dim: int, dampening: float) -> BlockTrace:
    """Greedy OBS over attention: whole KV groups (all their query heads and their K and V) one at a
    time; then from each number of groups, one query head from every group per round. `levels` are
    the ones wanted, within `present`."""
    per_group = present.heads
    groups = obs_prune(weight, hessian, per_group * head_dim, {level.groups for level in levels} | {0}, dampening)
    wanted, found = set(levels), {}
    for count, error in zip(groups.levels, groups.errors):
        removed = set(groups.order[: present.groups - count])
        heads = unit_heads([g for g in range(present.groups) if g not in removed], per_group)
        found[AttentionLevel(count, per_group) if count else REMOVED_ATTENTION] = (heads, error)
        fewer = [level.heads for level in wanted if level.groups == count and level.heads < per_group]
        if count and fewer:
            rounds = prune_heads_per_group(weight, hessian, heads, per_group, head_dim, min(fewer), dampening)
            found.update({AttentionLevel(count, per_group - 1 - r): result for r, result in enumerate(rounds)})
    chosen = sorted(wanted, reverse=True)
    return BlockTrace(chosen, [found[level][1] for level in chosen], [found[level][0] for level in chosen], hessian)


@dataclass
class LevelDatabase:
    """Per layer and block, the OBS trace of the model it was built on. That model is the dense one,
    or for gradual pruning a pruned one: `base` says which structures of the dense model it keeps,
    and a trace's structure ids index into those."""

    shape: ModelShape
    blocks: list[dict[str, BlockTrace]]  # per layer, per block
    dampening: float
    metadata: dict = field(default_factory=dict)
    base: PruningPlan | None = None  # None: the dense model
    loss_scales: list[dict[str, float]] | None = None  # per layer and block; None: relative errors as they are
    _weights: dict = field(default_factory=dict, repr=False, compare=False)

    def search_blocks(self, table: LatencyTable) -> list[BlockLevels]:
        """The search problem: per layer and block, time and error at every level (ascending)."""
        problem = []
        for idx, layer in enumerate(self.blocks):
            for block in BLOCKS:
                trace = layer[block]
                levels = sorted(trace.levels)
                scale = 1.0 if self.loss_scales is None else self.loss_scales[idx][block]
                error_at = {level: scale * error for level, error in zip(trace.levels, trace.errors)}
                problem.append(BlockLevels(
                    name=f"layer{idx}.{block}", levels=tuple(levels),
                    times=tuple(table.time(block, k) for k in levels), errors=tuple(error_at[k] for k in levels)))
        return problem

    def kept_counts(self, problem: list[BlockLevels], choice: list[int]) -> list[tuple[AttentionLevel, int]]:
        """(attention level, FFN neurons) kept per layer for a search choice."""
        counts = [b.levels[i] for b, i in zip(problem, choice)]
        return list(zip(counts[0::2], counts[1::2]))

    def plan(self, counts: list[tuple[AttentionLevel, int]]) -> PruningPlan:
        """The plan of a choice, in the dense model's indices (through `base`)."""
        return (self.base or PruningPlan.dense(self.shape)).compose(self.current_ids(counts))

    def current_ids(self, counts: list[tuple[AttentionLevel, int]]) -> list[dict[str, list[int]]]:
        """Per layer and block, the structures a choice keeps (query heads, neurons), as ids into the model
        the database was built on."""
        return [{ATTENTION: layer[ATTENTION].kept(a), FFN: layer[FFN].kept(f)} for layer, (a, f) in zip(self.blocks, counts)]

    def reconstructed(self, layer: int, block: str, weight: torch.Tensor, level: AttentionLevel | int) -> torch.Tensor:
        """OBS weights of the kept columns at `level`; the dense `weight` is (d_out, d_in).
        Memoised: the search stitches the same level of a block many times."""
        key = (layer, block, level)
        if key not in self._weights:
            trace = self.blocks[layer][block]
            self._weights[key] = reconstruct_weights(weight.double(), trace.hessian, trace.kept(level),
                                                     column_width(self.shape, block), self.dampening).to(weight.dtype)
        return self._weights[key]

    # --- files -------------------------------------------------------------------------------

    def payload(self) -> dict:
        """What `save` writes: plain lists and tensors, which `torch.load(weights_only=True)` reads."""
        return {"format": FORMAT, "shape": self.shape.__dict__, "dampening": self.dampening, "metadata": self.metadata,
                "loss_scales": self.loss_scales,
                   "blocks": [{b: {"levels": [list(level) if b == ATTENTION else level for level in t.levels],
                                   "errors": t.errors, "kept": [torch.tensor(k, dtype=torch.int32) for k in t.kept_sets],
                                   "hessian": t.hessian.float()} for b, t in layer.items()} for layer in self.blocks]}

    def save(self, path: Path) -> None:
        payload = self.payload()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> LevelDatabase:
        """Read a saved database, checked against its shape: a file holding anything else raises here
        (ValueError, or KeyError/TypeError for a missing or mistyped field), not mid-search."""
        payload = torch.load(path, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a level database ({FORMAT})")
        shape = ModelShape(**payload["shape"])
        layers = payload["blocks"]
        if not isinstance(layers, list) or len(layers) != shape.num_layers:
            raise ValueError(f"{path} does not hold {shape.num_layers} layers")
        blocks = [{block: _trace(layer, shape, block) for block in BLOCKS} for layer in layers]
        return cls(shape, blocks, float(payload["dampening"]), dict(payload["metadata"]),
                   loss_scales=_loss_scales(payload["loss_scales"], shape))


def _loss_scales(value, shape: ModelShape) -> list[dict[str, float]] | None:
    """Saved loss scales: none, or a finite number >= 0 per layer and block."""
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == shape.num_layers
            and all(isinstance(layer, dict) and sorted(layer) == sorted(BLOCKS) for layer in value)):
        raise ValueError(f"loss scales are not {shape.num_layers} layers of {', '.join(BLOCKS)}")
    scales = [{block: float(layer[block]) for block in BLOCKS} for layer in value]
    if not all(math.isfinite(v) and v >= 0 for layer in scales for v in layer.values()):
        raise ValueError("loss scales are not finite numbers >= 0")
    return scales


def _trace(layer: dict, shape: ModelShape, block: str) -> BlockTrace:
    """One saved block, checked against the shape: levels from the full block down to removed, each with
    an error and its kept structures (distinct ids within the block), and a square Hessian of the output
    projection's inputs."""
    saved = layer[block]
    levels, errors, hessian = saved["levels"], saved["errors"], saved["hessian"]
    kept = [k.tolist() for k in saved["kept"]]
    if block == ATTENTION:
        levels = [AttentionLevel(*level) for level in levels]
    full, total = shape.full_level(block), shape.structures(block)
    side = total * column_width(shape, block)
    if not (levels[0] == full and levels[-1] == removed_level(block) and len(errors) == len(levels) == len(kept)):
        raise ValueError(f"{block} levels do not run from {full} to removed with an error and kept structures at each")
    if any(len(set(k)) != len(k) or not all(0 <= i < total for i in k) for k in kept):
        raise ValueError(f"{block} kept structures are not distinct ids below {total}")
    if not (isinstance(hessian, torch.Tensor) and hessian.shape == (side, side)):
        raise ValueError(f"{block} Hessian is not {side} x {side}")
    return BlockTrace(levels, list(errors), kept, hessian.double())


def build_database(model: nn.Module, calibration: Calibration, table: LatencyTable, dampening: float = 0.01,
                   base: PruningPlan | None = None, kind: ModelKind | None = None) -> LevelDatabase:
    """Hessians from the inputs of `model` (dense, or pruned as `base` says), then greedy OBS per block
    down to removed, errors at every table level within the block's current size. With the model's
    `kind`, also each block's Fisher on the calibration loss (`loss_scales`); without, relative errors."""
    started = time.perf_counter()
    scales = None
    if kind is not None:
        with stage("block Fisher", "one backward pass over the calibration data"):
            scales = floored(block_fisher(model, kind, calibration.batches()))
    config, shape = model.config, model_shape(model.config)
    current = (base or PruningPlan.dense(shape)).kept_counts()
    inputs = capture_inputs(model, calibration.batches())
    blocks = []
    for idx, layer in enumerate(bar(model_layers(model), desc="level database", leave=False)):
        hessians = block_hessians(layer, config, inputs)
        blocks.append({block: block_trace(layer, config, block, hessians.get(block), present, table.choices(block),
                                          dampening, f"layer {idx} {block}")
                       for block, present in zip(BLOCKS, current[idx])})
        inputs = propagate(layer, inputs)
    return LevelDatabase(shape, blocks, dampening, {"seconds": round(time.perf_counter() - started, 2),
                                                   "samples": calibration.num_samples,
                                                   "tokens": calibration.tokens.num_tokens}, base, scales)


def floored(fisher: list[dict[str, float]]) -> list[dict[str, float]]:
    """Block Fisher, each at least FISHER_FLOOR x the mean over present blocks (removed blocks stay 0)."""
    present = [v for layer in fisher for v in layer.values() if v > 0]
    floor = FISHER_FLOOR * (sum(present) / len(present)) if present else 0.0
    return [{block: max(v, floor) if v > 0 else 0.0 for block, v in layer.items()} for layer in fisher]


def block_trace(layer: nn.Module, config, block: str, hessian: torch.Tensor | None, present: AttentionLevel | int,
                levels: list, dampening: float, where: str) -> BlockTrace:
    """The block's trace at `levels` that fit within `present` (which is included, as is removed); a
    block already removed has one level."""
    if present == removed_level(block):
        return BlockTrace([present], [0.0], [[]], torch.zeros(0, 0, dtype=torch.float64))
    levels = sorted({present, removed_level(block), *(level for level in levels if fits(level, present))}, reverse=True)
    weight = weight_out_in(output_projection(layer, config, block)).double()
    try:
        if block == ATTENTION:
            return head_trace(weight, hessian, levels, present, model_shape(config).head_dim, dampening)
        return neuron_trace(weight, hessian, levels, dampening)
    except ValueError as err:
        if "NaN" in str(err) or "Inf" in str(err):
            raise UserError(f"{where}: Hessian has NaN or Inf; check the model weights and the calibration data") from None
        raise


def file_digest(path: Path) -> str:
    """A file's SHA-256: what it holds, whatever copy or download last touched it. Read once per version
    of the file in a process: a run names its calibration file in the family manifest and in the level
    database's key, and its training file is often the same one."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and time key the cache: a changed file is read again
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def data_identity(source: str) -> dict:
    """A data file by its content (a dataset name as it is). Not by modification time: a run resumed where
    the data was fetched or copied again (a restarted job, a new container) reads the same text."""
    path = Path(source)
    if not path.exists():
        return {"name": source}
    return {"size": path.stat().st_size, "sha256": file_digest(path)}


def database_key(model_fingerprint: dict, calibration: Calibration, table: LatencyTable, dampening: float,
                 num_samples: int, seed: int, block_errors: str) -> str:
    key = {"format": FORMAT, "model": model_fingerprint, "data": data_identity(calibration.source), "seq_len": calibration.seq_len,
           "samples": num_samples, "seed": seed, "dampening": dampening, "block_errors": block_errors,
           "levels": {b: [str(level) for level in table.choices(b)] for b in BLOCKS}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def cached_database(cache_dir: Path, key: str, build) -> LevelDatabase:
    """Load the database for `key` from the cache, or build and store it."""
    path = cache_dir / f"leveldb-{key}.pt"
    db = load_cached(path)
    if db is None:
        db = build()
        store_cached(db, path)
    return db


def load_cached(path: Path) -> LevelDatabase | None:
    """The cached database at `path`; None, with the file deleted, where there is none that loads."""
    if not path.exists():
        return None
    try:
        db = LevelDatabase.load(path)
    except Exception as err:  # a cache: random bytes, a foreign pickle, an old format all just mean rebuild
        # the error's own text only at -vv: torch's weights_only one is a paragraph of advice that does not apply
        log.warning("deleting unreadable level-database cache entry %s (%s); recomputing it", path, type(err).__name__)
        log.debug("the cache entry %s failed to load: %s", path, err)
        with contextlib.suppress(OSError):  # then the store below replaces it, or warns
            path.unlink()
        return None
    log.info("level database from cache %s", path)
    db.metadata["cached"] = True
    return db


def store_cached(db: LevelDatabase, path: Path) -> None:
    """Save to the cache; a cache that cannot be written costs the next run a rebuild, not this run."""
    try:
        db.save(path)
    except OSError as err:
        log.warning("cannot store the level database in %s (%s); the next run rebuilds it", path, err.strerror or err)
