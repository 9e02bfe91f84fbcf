"""Profile a deployment machine: time the model's own blocks at every pruned size.

Each candidate is the model's first layer, cut to a size by the same surgery the planner
uses, with the other block of the layer removed, called with exactly the arguments the
model passes its layers (captured by a hook on a real forward). Attention is timed at every
(KV groups, query heads per group) pair, the FFN on a grid of neuron counts, and the fixed part
is the whole model with every layer removed. All candidates are timed interleaved on the spec's backend; a few
whole models with random per-layer sizes check that the sum of block times predicts them.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapters import REMOVED_ATTENTION, AttentionLevel, ModelShape, architecture_for, model_layers, model_shape
from .backends import TensorCall, backend_for, input_names, model_call, random_inputs
from .gguf_export import check_gguf_widths, model_vocabulary
from .environment import CpuSnapshot, library_versions, machine_info, now, others_share
from .errors import UserError
from .kvcache import cache_argument, find_cache
from .kinds import ModelKind
from .models import LoadedModel
from .progress import bar, stage
from .spec import DECODERS_ONLY, InferenceSpec, check_exportable
from .surgery import LayerPlan, PruningPlan, apply_plan, prune_attention, prune_ffn
from .layers import capture_first_layer_call
from .settings import ProfileSettings
from .table import ATTENTION, FFN, FIXED, TRUST_ADVICE, LatencyTable
from .timing import TimingStats, time_interleaved

log = logging.getLogger(__name__)


def ffn_levels(intermediate_size: int, step: int) -> list[int]:
    return sorted(set(range(step, intermediate_size, step)) | {intermediate_size})


def attention_levels(shape: ModelShape) -> list[AttentionLevel]:
    """Every attention size the search may choose: any number of KV groups, any number of query heads in each."""
    return [AttentionLevel(g, h) for g in range(1, shape.attention_units + 1) for h in range(1, shape.q_per_unit + 1)]


# --- inputs -----------------------------------------------------------------------------------


class FrozenKV:
    """A KV cache for timing one layer: returns the cached context plus the new token and stores
    nothing, so every repetition sees the same context length."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (batch, kv_heads, context, head_dim)

    def update(self, key, value, layer_idx, *args, **kwargs):
        return torch.cat([self.keys, key], dim=-2), torch.cat([self.values, value], dim=-2)


PAST_KEY, PAST_VALUE = "past_key", "past_value"  # a decode block's cached context, a graph input as deployed


@dataclass
class Workload:
    """One spec's model inputs, and how to run a whole model on them. A backend that runs files of its
    own (llama.cpp) takes the first sequence's token ids, context included, and writes the tokenizer."""

    inputs: dict[str, torch.Tensor]
    names: list[str]
    call: Callable[[nn.Module], TensorCall]
    kind: ModelKind
    tokens: list[int]
    vocabulary: object  # what gguf_export writes as the tokenizer of a model.gguf


def prefill_workload(loaded: LoadedModel, spec: InferenceSpec, seed: int) -> Workload:
    names = input_names(loaded.model, loaded.tokenizer)
    inputs = random_inputs(loaded.model, names, spec.batch_size, spec.seq_len, seed)
    return Workload(inputs, names, lambda model: model_call(model, loaded.kind, names), loaded.kind,
                    inputs["input_ids"][0].tolist(), model_vocabulary(loaded))


def decode_workload(loaded: LoadedModel, spec: InferenceSpec, seed: int) -> Workload:
    """One new token per sequence after `context` cached ones; the cache is cropped back after each
    call. Each timed model gets its own cache, filled by its own prefill."""
    inputs = random_inputs(loaded.model, ["input_ids", "attention_mask"], spec.batch_size, spec.context + 1, seed)

    def call(model: nn.Module) -> TensorCall:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with_cache = {cache_argument(model): cache, "use_cache": True}
        with torch.inference_mode():
            model(input_ids=inputs["input_ids"][:, :-1], attention_mask=inputs["attention_mask"][:, :-1], **with_cache)

        def step(m, named):
            logits = m(**named, **with_cache).logits
            cache.crop(-1)  # drop the token just added: the context stays `spec.context` long
            return logits
        return TensorCall(model, ["input_ids", "attention_mask"], step)

    step_inputs = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": inputs["attention_mask"]}
    return Workload(step_inputs, ["input_ids", "attention_mask"], call, loaded.kind, inputs["input_ids"][0].tolist(),
                    model_vocabulary(loaded))


def workload(loaded: LoadedModel, spec: InferenceSpec, seed: int = 0) -> Workload:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    length = spec.context + spec.tokens
    if limit is not None and length > limit:
        what = f"--context {spec.context} plus the new token" if spec.mode == "decode" else f"--seq-len {spec.seq_len}"
        raise UserError(f"{what} is {length} tokens, more than the model's {limit} positions: use a shorter one")
    if spec.backend in DECODERS_ONLY:
        check_exportable(loaded.model.config.model_type, spec.gguf_type)
    if spec.mode == "decode":
        if not loaded.kind.generates:
            raise UserError("decode mode is for causal LMs: use --mode prefill for this model")
        return decode_workload(loaded, spec, seed)
    return prefill_workload(loaded, spec, seed)


def capture_layer_call(model: nn.Module, work: Workload) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments the model passes its first layer under `work`."""
    call = work.call(model)  # a decode workload's prefill runs here, before the hook is in place
    return capture_first_layer_call(model, lambda: call(*(work.inputs[n] for n in work.names)))


# --- block candidates ---------------------------------------------------------------------------


def split_tensor_kwargs(kwargs: dict) -> tuple[dict[str, torch.Tensor], Callable[[dict], dict]]:
    """Tensors (also inside tuples, like rotary position embeddings) become named inputs, so a
    layer call can be exported to ONNX; everything else is held fixed."""
    tensors, static = {}, {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.Tensor) for v in value):
            tensors.update({f"{key}.{i}": v for i, v in enumerate(value)})
        else:
            static[key] = value

    def rebuild(named: dict) -> dict:
        out = dict(static)
        for key, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                out[key] = named[key]
            elif key not in static:
                out[key] = tuple(named[f"{key}.{i}"] for i in range(len(value)))
        return out
    return tensors, rebuild


def candidate_plan(shape: ModelShape, block: str, level: AttentionLevel | int) -> LayerPlan:
    """A layer that keeps `block` at `level` and not the other block."""
    return LayerPlan.first(shape, level, 0) if block == ATTENTION else LayerPlan.first(shape, REMOVED_ATTENTION, level)


def layer_candidate(layer: nn.Module, model: nn.Module, block: str, level: AttentionLevel | int) -> nn.Module:
    """The first layer with `block` at `level` and the other block removed."""
    arch, shape = architecture_for(model.config), model_shape(model.config)
    layer = copy.deepcopy(layer)
    kept = candidate_plan(shape, block, level)
    prune_attention(layer, arch, shape, kept.heads(shape), 0)
    prune_ffn(layer, arch, kept.ffn, 0)
    return layer


def layer_call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, kv_heads: int | None) -> tuple[TensorCall, dict]:
    """One layer's call on the captured arguments. In decode mode its attention reads a cached context
    of `kv_heads` heads, given as inputs (`past_key`, `past_value`) as a deployed decoder is given
    them, so an ONNX export copies them in on every call."""
    cache_name, captured = find_cache(kwargs)
    past = {}
    if captured is not None:
        kwargs = {**kwargs, cache_name: None}  # attention removed: nothing reads the cache
        if kv_heads is not None:
            cached = captured.layers[0].keys  # (batch, kv_heads, context, head_dim)
            keys = torch.randn(hidden.shape[0], kv_heads, *cached.shape[-2:], dtype=hidden.dtype)
            past = {PAST_KEY: keys, PAST_VALUE: keys.clone()}
    tensors, rebuild = split_tensor_kwargs(kwargs)

    def forward(module, named):
        arguments = rebuild(named)
        if past:
            arguments[cache_name] = FrozenKV(named[PAST_KEY], named[PAST_VALUE])
        out = module(named["hidden_states"], **arguments)
        return out[0] if isinstance(out, tuple) else out
    inputs = {"hidden_states": hidden, **tensors, **past}
    return TensorCall(layer, list(inputs), forward), inputs


def fixed_part(model: nn.Module) -> nn.Module:
    """The model with every layer removed: embeddings, final norm, head and per-layer overhead."""
    shape = model_shape(model.config)
    return apply_plan(copy.deepcopy(model), PruningPlan(shape, [LayerPlan([], [])] * shape.num_layers))


# --- the profile --------------------------------------------------------------------------------


def profile_model(loaded: LoadedModel, spec: InferenceSpec, settings: ProfileSettings = ProfileSettings()) -> LatencyTable:
    """Build the latency table of `loaded` on this machine for `spec`. A table that fails its trust
    checks is profiled again, up to `settings.retries` times, and the soundest one kept: a VM's noisy
    spells pass in minutes (a SmolLM2 table timed 1.5x slow was sound when profiled 7 minutes later),
    and a profile takes a minute or two."""
    started = time.perf_counter()
    attempts = 1 + settings.retries
    tables = []
    for attempt in range(1, attempts + 1):
        tables.append(profile_once(loaded, spec, settings))
        problems = tables[-1].trust_problems()
        if not problems:
            break
        if attempt < attempts:
            log.warning("latency table, attempt %d of %d: %s: profiling again", attempt, attempts, "; ".join(problems))
    table = min(tables, key=soundness)
    table.metadata.update(attempts=len(tables), profile_seconds=round(time.perf_counter() - started, 1))
    for problem in table.trust_problems():
        log.warning("latency table: %s: %s", problem, TRUST_ADVICE)
    return table


def soundness(table: LatencyTable) -> tuple:
    """Sort key, soundest first: fewer failed trust checks, then smaller additivity errors."""
    return len(table.trust_problems()), *table.additivity_errors()


def profile_once(loaded: LoadedModel, spec: InferenceSpec, settings: ProfileSettings) -> LatencyTable:
    cpu_before = CpuSnapshot.now()  # what else runs here while this profile times
    shape = loaded.shape
    if spec.backend in DECODERS_ONLY:
        check_gguf_widths(shape, spec.gguf_type, settings.ffn_step)
    torch.set_num_threads(spec.threads)
    grid = {ATTENTION: attention_levels(shape), FFN: ffn_levels(shape.intermediate_size, settings.ffn_step)}
    with stage("profile", f"{loaded.source.reference}, {spec.backend} on {spec.device}, {spec.mode}"), \
            tempfile.TemporaryDirectory(prefix="ziplm-profile-") as tmp:
        work, backend = workload(loaded, spec, settings.seed), backend_for(spec)
        block_runners = stacked_block_runners if backend.runs_whole_models_only else layer_block_runners
        runners = block_runners(loaded.model, work, grid, spec, Path(tmp))
        with stage("timing blocks", f"{len(runners)} blocks x {settings.rounds} rounds, interleaved"):
            stats = time_interleaved(runners, settings.rounds, settings.warmup, settings.seed,
                                     backend.synchronizer(spec), description=f"timing {len(runners)} blocks")
        if backend.runs_whole_models_only:
            stats = per_layer_stats(stats, shape.num_layers)
        records = [{"block": block, **record_fields(level), "time_ms": s.estimate(settings.estimator), **s.to_dict()}
                   for (block, level), s in sorted(stats.items())]
        table = LatencyTable(spec, shape, settings.estimator, records)
        table.additivity = measure_additivity(loaded, table, work, settings, Path(tmp))
    table.metadata = {
        **table.metadata, "model": loaded.source.reference, "model_kind": loaded.kind.name, "created": now(), "machine": machine_info(),
        "versions": library_versions(), "settings": asdict(settings),
        "others_cpu_share": _rounded(others_share(cpu_before, CpuSnapshot.now())),
    }
    return table


def record_fields(level: AttentionLevel | int) -> dict[str, int]:
    """A table record's level fields: groups and heads per group for attention, a count otherwise."""
    return {"level": level.groups, "heads": level.heads} if isinstance(level, AttentionLevel) else {"level": level}


def layer_block_runners(model: nn.Module, work: Workload, grid: dict[str, list], spec: InferenceSpec,
                        workdir: Path) -> dict[tuple[str, AttentionLevel | int], Callable[[], object]]:
    """A runner per (block, level) of `grid` on the spec's backend, and one for the fixed part."""
    backend = backend_for(spec)
    hidden, kwargs = capture_layer_call(model, work)
    first_layer = model_layers(model)[0]
    runners = {}
    todo = [(block, level) for block, levels in grid.items() for level in levels]
    with stage("building blocks", f"{len(todo)} sizes of the first layer and the fixed part"):
        for block, level in bar(todo, desc=f"building blocks ({spec.backend})", leave=False):
            layer = layer_candidate(first_layer, model, block, level)
            kv_heads = level.groups if block == ATTENTION else None
            call, inputs = layer_call(layer, hidden, kwargs, kv_heads)
            runners[(block, level)] = backend.block_runner(call, inputs, spec, workdir, f"{block}{level}")
        runners[(FIXED, 0)] = backend.model_runner(fixed_part(model), work, spec, workdir, "fixed")[0]
    return runners


def stacked_block_runners(model: nn.Module, work: Workload, grid: dict[str, list], spec: InferenceSpec,
                          workdir: Path) -> dict[tuple[str, AttentionLevel | int], Callable[[], object]]:
    """For a backend that runs whole models only (llama.cpp): a runner per (block, level) of `grid`, the
    whole model with every layer keeping that block at that level and not the other, and one for the
    fixed part (`per_layer_stats` makes block times of them). A layer's block is timed in its place
    among the others, with the memory traffic of a model of that many layers, and the files are written
    as members are (gguf_export's zero blocks included: what the member's file runs)."""
    backend, shape = backend_for(spec), model_shape(model.config)
    todo = [(block, level) for block, levels in grid.items() for level in levels]
    runners = {}
    with stage("building blocks", f"{len(todo)} models, each of {shape.num_layers} layers of one block size, "
                                  "and the fixed part"):
        for block, level in bar(todo, desc=f"building blocks ({spec.backend})", leave=False):
            plan = PruningPlan(shape, [candidate_plan(shape, block, level)] * shape.num_layers)
            runners[(block, level)] = backend.model_runner(apply_plan(copy.deepcopy(model), plan), work, spec, workdir,
                                                           f"{block}{level}")[0]
        runners[(FIXED, 0)] = backend.model_runner(fixed_part(model), work, spec, workdir, "fixed")[0]
    return runners


def per_layer_stats(stats: dict[tuple, TimingStats], layers: int) -> dict[tuple, TimingStats]:
    """Stacked blocks' times per layer: each statistic of a stacked model less the fixed part's, over the
    layers. A difference of two low quantiles, each steady, rather than a quantile of the rounds'
    differences, which holds the noise of both (a small FFN's came out at 0). Never below zero: a block
    whose stack the timer cannot tell from the fixed part costs nothing that can be measured."""
    fixed = stats[(FIXED, 0)]

    def per_layer(timed: TimingStats) -> TimingStats:
        def less_fixed(name: str) -> float:
            return max(0.0, (getattr(timed, name) - getattr(fixed, name)) / layers)
        return TimingStats(*(less_fixed(name) for name in ("min_ms", "p10_ms", "median_ms", "p90_ms")), timed.runs)
    return {key: timed if key == (FIXED, 0) else per_layer(timed) for key, timed in stats.items()}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def random_kept_counts(table: LatencyTable, rng: random.Random, size: float) -> list[tuple[AttentionLevel, int]]:
    """A random model of about `size` (0..1) of the dense one: every block at a random level within
    a quarter of the level list around that share."""
    def level(levels: list):
        share = min(1.0, max(0.0, rng.uniform(size - 0.25, size + 0.25)))
        return levels[round(share * (len(levels) - 1))]
    attention, ffn = table.choices(ATTENTION), table.choices(FFN)
    return [(level(attention), level(ffn)) for _ in range(table.shape.num_layers)]


def fit_ratio(sums: list[float], measured: list[float]) -> tuple[float, float, float]:
    """measured ~ scale * block sum: the median ratio. (scale, offset 0, line_from 0)"""
    return statistics.median(m / s for m, s in zip(measured, sums)), 0.0, 0.0


def fit_line(sums: list[float], measured: list[float]) -> tuple[float, float, float]:
    """measured ~ scale * block sum + offset over the measured range, least squares in relative error;
    below the smallest model measured (`line_from`) the table scales proportionally, since a line is
    no guide where nothing was measured. The ratio alone when the points cannot fix a line."""
    if len(sums) < 3 or max(sums) <= 1.05 * min(sums):
        return fit_ratio(sums, measured)
    scale, offset = np.polyfit(sums, measured, 1, w=[1 / m for m in measured])
    if scale <= 0 or scale * min(sums) + offset <= 0:
        return fit_ratio(sums, measured)
    return float(scale), float(offset), min(sums)


WHOLE_MODEL_FITS = {"ratio": fit_ratio, "line": fit_line}


def leave_one_out(fit, sums: list[float], measured: list[float]) -> list[float]:
    """Each model's relative error when predicted by `fit` on the other models."""
    return [predicted_from_fit(fit(sums[:i] + sums[i + 1:], measured[:i] + measured[i + 1:]), sums[i]) / measured[i] - 1
            for i in range(len(sums))]


def predicted_from_fit(fit: tuple[float, float, float], block_sum: float) -> float:
    scale, offset, line_from = fit
    return LatencyTable.whole_model_ms(block_sum, scale, offset, line_from)


def fit_whole_models(sums: list[float], measured: list[float]) -> tuple[str, float, float, float]:
    """(fit name, scale, offset, line_from): the ratio or the line, whichever predicts the measured
    whole models better when each is left out in turn. The line follows small models that run
    cache-warm; on a noisy machine, or with few models, the ratio is steadier; cross-validation says
    which holds here."""
    def median_error(name):
        return statistics.median(abs(e) for e in leave_one_out(WHOLE_MODEL_FITS[name], sums, measured))
    name = min(WHOLE_MODEL_FITS, key=median_error) if len(sums) > 1 else "ratio"
    return (name, *WHOLE_MODEL_FITS[name](sums, measured))


def measure_models(loaded: LoadedModel, plans: list[PruningPlan], spec: InferenceSpec, work: Workload,
                   rounds: int, warmup: int, seed: int, workdir: Path, description: str) -> list[TimingStats]:
    """Whole pruned models, timed interleaved on the spec's backend."""
    backend, runners = backend_for(spec), {}
    for i, plan in enumerate(bar(plans, desc="building models", leave=False)):
        pruned = apply_plan(copy.deepcopy(loaded.model), plan)
        runners[i] = backend.model_runner(pruned, work, spec, workdir, f"model{i}")[0]
    stats = time_interleaved(runners, rounds, warmup, seed, backend.synchronizer(spec), description=description)
    return [stats[i] for i in range(len(plans))]


def measure_additivity(loaded: LoadedModel, table: LatencyTable, work: Workload, settings: ProfileSettings,
                       workdir: Path) -> list[dict]:
    """Whole models, the dense one and random ones spread from small to large, against the block sum:
    fits the table's scale and offset and reports each model's error with the line fitted on the others."""
    rng = random.Random(settings.seed)
    shape, models = table.shape, settings.additivity_models
    counts = [shape.dense_kept]
    counts += [random_kept_counts(table, rng, (i + 1) / (models + 1)) for i in range(models)]
    plans = [PruningPlan(shape, [LayerPlan.first(shape, a, f) for a, f in kept]) for kept in counts]
    with stage("additivity check", f"the dense model and {models} random pruned ones, small to large"):
        stats = measure_models(loaded, plans, table.spec, work, settings.additivity_rounds, settings.warmup,
                               settings.seed, workdir, "additivity check")
    sums = [table.block_sum(kept) for kept in counts]
    measured = [s.estimate(settings.estimator) for s in stats]
    fit, table.scale, table.offset_ms, table.line_from_ms = fit_whole_models(sums, measured)
    table.metadata["whole_model_fit"] = fit
    errors = leave_one_out(WHOLE_MODEL_FITS[fit], sums, measured)
    return [{"kept": kept, "block_sum_ms": total, "predicted_ms": (1 + error) * m, "measured_ms": m, "error": error,
             "unscaled_error": total / m - 1, "measured": s.to_dict()}
            for kept, total, m, error, s in zip(counts, sums, measured, errors, stats)]
