"""The level database: for every layer and block, the OBS removal order and the error at every
level the latency table has. Computed once, it serves every target.

Weights are not stored per level: greedy OBS with exact inverse-Hessian updates is a least-
squares solve for the removed set (obs.reconstruct_weights), so the Hessian and the removal
order rebuild any level's weights on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import ATTENTION, BLOCKS, FFN, ModelShape, model_layers, model_shape
from .calibrate import Calibration
from .errors import UserError
from .layers import block_hessians, capture_inputs, output_projection, propagate, weight_out_in
from .obs import obs_prune, reconstruct_weights
from .progress import bar
from .search import BlockLevels
from .surgery import PruningPlan
from .table import LatencyTable

log = logging.getLogger(__name__)

FORMAT = "ziplm-planner/level-database/v2"  # v2: Hessians of correctly masked layer inputs


def group_size(shape: ModelShape, block: str) -> int:
    return shape.q_per_unit * shape.head_dim if block == ATTENTION else 1


def total_structures(shape: ModelShape, block: str) -> int:
    return shape.attention_units if block == ATTENTION else shape.intermediate_size


def table_levels(table: LatencyTable, block: str) -> list[int]:
    """Levels the search may choose: 0 (block removed) and every size the table timed."""
    return [0, *table.levels(block)]


@dataclass
class BlockTrace:
    """One block of one layer: OBS removal order and relative output error per level."""

    levels: list[int]  # structures kept, descending from all to 0
    errors: list[float]
    order: list[int]  # structure ids in the order OBS removed them
    hessian: torch.Tensor  # (d_in, d_in) undamped, float32 on disk

    def kept(self, level: int) -> list[int]:
        total = self.levels[0]
        removed = set(self.order[: total - level])
        return [i for i in range(total) if i not in removed]


def obs_trace(layer: nn.Module, config, block: str, hessian: torch.Tensor, levels: list[int], dampening: float,
              where: str) -> BlockTrace:
    shape = model_shape(config)
    weight = weight_out_in(output_projection(layer, config, block))
    try:
        trace = obs_prune(weight.double(), hessian, group_size(shape, block), levels, dampening)
    except ValueError as err:
        if "NaN" in str(err) or "Inf" in str(err):
            raise UserError(f"{where}: Hessian has NaN or Inf; check the model weights and the calibration data") from None
        raise
    return BlockTrace(trace.levels, trace.errors, trace.order, hessian)


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
    _weights: dict = field(default_factory=dict, repr=False, compare=False)

    def search_blocks(self, table: LatencyTable) -> list[BlockLevels]:
        """The search problem: per layer and block, time and error at every level (ascending)."""
        problem = []
        for idx, layer in enumerate(self.blocks):
            for block in BLOCKS:
                trace = layer[block]
                levels = sorted(trace.levels)
                error_at = dict(zip(trace.levels, trace.errors))
                problem.append(BlockLevels(
                    name=f"layer{idx}.{block}", levels=tuple(levels),
                    times=tuple(table.time(block, k) for k in levels), errors=tuple(error_at[k] for k in levels)))
        return problem

    def kept_counts(self, problem: list[BlockLevels], choice: list[int]) -> list[tuple[int, int]]:
        """(attention, FFN) structures kept per layer for a search choice."""
        counts = [b.levels[i] for b, i in zip(problem, choice)]
        return list(zip(counts[0::2], counts[1::2]))

    def plan(self, counts: list[tuple[int, int]]) -> PruningPlan:
        """The plan of a choice, in the dense model's indices (through `base`)."""
        return (self.base or PruningPlan.dense(self.shape)).compose(self.current_ids(counts))

    def current_ids(self, counts: list[tuple[int, int]]) -> list[dict[str, list[int]]]:
        """Per layer and block, the structures a choice keeps, as ids into the model the database was built on."""
        return [{ATTENTION: layer[ATTENTION].kept(a), FFN: layer[FFN].kept(f)} for layer, (a, f) in zip(self.blocks, counts)]

    def reconstructed(self, layer: int, block: str, weight: torch.Tensor, level: int) -> torch.Tensor:
        """OBS weights of the kept columns at `level`; the dense `weight` is (d_out, d_in).
        Memoised: the search stitches the same level of a block many times."""
        key = (layer, block, level)
        if key not in self._weights:
            trace = self.blocks[layer][block]
            self._weights[key] = reconstruct_weights(weight.double(), trace.hessian, trace.kept(level),
                                                     group_size(self.shape, block), self.dampening).to(weight.dtype)
        return self._weights[key]

    # --- files -------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        payload = {"format": FORMAT, "shape": self.shape.__dict__, "dampening": self.dampening, "metadata": self.metadata,
                   "blocks": [{b: {"levels": t.levels, "errors": t.errors, "order": t.order,
                                   "hessian": t.hessian.float()} for b, t in layer.items()} for layer in self.blocks]}
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
        return cls(shape, blocks, float(payload["dampening"]), dict(payload["metadata"]))


def _trace(layer: dict, shape: ModelShape, block: str) -> BlockTrace:
    """One saved block, checked against the shape: levels from all to 0 with an error each, the removal
    order a permutation of the structures, and a square Hessian of the output projection's inputs."""
    saved, total = layer[block], total_structures(shape, block)
    levels, errors, order, hessian = saved["levels"], saved["errors"], saved["order"], saved["hessian"]
    side = total * group_size(shape, block)
    if not (levels[0] == total and levels[-1] == 0 and len(errors) == len(levels)):
        raise ValueError(f"{block} levels do not run from {total} to 0 with an error at each")
    if sorted(order) != list(range(total)):
        raise ValueError(f"{block} removal order is not a permutation of {total} structures")
    if not (isinstance(hessian, torch.Tensor) and hessian.shape == (side, side)):
        raise ValueError(f"{block} Hessian is not {side} x {side}")
    return BlockTrace(list(levels), list(errors), list(order), hessian.double())


def build_database(model: nn.Module, calibration: Calibration, table: LatencyTable, dampening: float = 0.01,
                   base: PruningPlan | None = None) -> LevelDatabase:
    """Hessians from the inputs of `model` (dense, or pruned as `base` says), then greedy OBS per block
    down to 0, errors at every table level up to the block's current size."""
    started = time.perf_counter()
    config, shape = model.config, model_shape(model.config)
    current = (base or PruningPlan.dense(shape)).kept_counts()
    inputs = capture_inputs(model, calibration.batches())
    blocks = []
    for idx, layer in enumerate(bar(model_layers(model), desc="level database", leave=False)):
        hessians = block_hessians(layer, config, inputs)
        blocks.append({block: block_trace(layer, config, block, hessians.get(block), count, table, dampening,
                                          f"layer {idx} {block}") for block, count in zip(BLOCKS, current[idx])})
        inputs = propagate(layer, inputs)
    return LevelDatabase(shape, blocks, dampening, {"seconds": round(time.perf_counter() - started, 2),
                                                   "samples": calibration.num_samples,
                                                   "tokens": calibration.tokens.num_tokens}, base)


def block_trace(layer: nn.Module, config, block: str, hessian: torch.Tensor | None, count: int, table: LatencyTable,
                dampening: float, where: str) -> BlockTrace:
    """The block's trace from its `count` structures down to 0; a block already removed has one level, 0."""
    if count == 0:
        return BlockTrace([0], [0.0], [], torch.zeros(0, 0, dtype=torch.float64))
    levels = [level for level in table_levels(table, block) if level <= count]
    return obs_trace(layer, config, block, hessian, levels, dampening, where)


def data_identity(source: str) -> dict:
    """A data file by path, size and modification time (a dataset name as it is)."""
    path = Path(source)
    if not path.exists():
        return {"name": source}
    return {"path": str(path.resolve()), "size": path.stat().st_size, "mtime": path.stat().st_mtime}


def database_key(model_fingerprint: dict, calibration: Calibration, table: LatencyTable, dampening: float,
                 num_samples: int, seed: int) -> str:
    key = {"format": FORMAT, "model": model_fingerprint, "data": data_identity(calibration.source), "seq_len": calibration.seq_len,
           "samples": num_samples, "seed": seed, "dampening": dampening,
           "levels": {b: table_levels(table, b) for b in BLOCKS}}
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
        reason = (str(err).splitlines() or [""])[0]
        log.warning("deleting unreadable level-database cache %s (%s: %s); rebuilding it", path, type(err).__name__,
                    reason)
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
