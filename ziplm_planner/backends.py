"""Running a module the way it is deployed: eager PyTorch, a real ONNX Runtime session, or llama.cpp
on the member's own GGUF file.

Every timed thing (a block at a pruned size, the fixed part, a whole model) is a `TensorCall`:
a module that takes named tensors positionally and returns a tensor (or a tuple of them). That
is what `torch.onnx.export` needs, and transformers 5 models cannot be exported directly (their
forward receives `use_cache` twice), so the same wrapper serves PyTorch and ONNX Runtime. llama.cpp
runs whole models only, written to GGUF as members ship (gguf_export.py).

A causal LM ships with its KV cache in the graph, named as Hugging Face Optimum names it:
inputs `input_ids`, `attention_mask` (past + new tokens), `position_ids` and per layer
`past_key_values.{i}.key/value`; outputs `logits` and `present.{i}.key/value`. One file serves
the prefill (an empty past) and every decode step.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .adapters import model_shape
from .errors import UserError
from .family import MEMBER_GGUF, MEMBER_ONNX
from .kvcache import cache_argument, cache_from_tensors, cache_tensors, find_cache
from .kinds import ModelKind
from .spec import InferenceSpec

if TYPE_CHECKING:
    from .profiler import Workload

log = logging.getLogger(__name__)

OPSET = 17


class TensorCall(nn.Module):
    """`fn(inner, inputs_by_name) -> Tensor or tuple of Tensors` as a module with positional tensor inputs."""

    def __init__(self, inner: nn.Module, names: list[str], fn: Callable[[nn.Module, dict], torch.Tensor | tuple]):
        super().__init__()
        self.inner, self.names, self.fn = inner, list(names), fn

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.fn(self.inner, dict(zip(self.names, tensors)))


def input_names(model: nn.Module, tokenizer) -> list[str]:
    """The inputs the tokenizer produces that the model's forward accepts, in the tokenizer's order."""
    if tokenizer is not None:
        names = list(tokenizer.model_input_names)
    else:
        names = ["input_ids", "token_type_ids", "attention_mask"] if model.config.model_type == "bert" \
            else ["input_ids", "attention_mask"]
    accepted = inspect.signature(model.forward).parameters
    return [name for name in names if name in accepted]


def random_inputs(model: nn.Module, names: list[str], batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (never the pad id: RoBERTa shifts its positions there), segment 0, a full mask."""
    generator = torch.Generator().manual_seed(seed)
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    if pad is not None:
        ids[ids == pad] = (pad + 1) % vocab
    make = {"input_ids": lambda: ids, "token_type_ids": lambda: torch.zeros(batch, seq, dtype=torch.long),
            "attention_mask": lambda: torch.ones(batch, seq, dtype=torch.long)}
    return {name: make[name]() for name in names}


def model_call(model: nn.Module, kind: ModelKind, input_names: list[str]) -> TensorCall:
    """The model's deployed output (`kind.output`) from named tensors."""
    return TensorCall(model, input_names, kind.output)


# --- the deployed model's ONNX file --------------------------------------------------------------

TRACE_SHAPE = (2, 7)  # (batch, sequence) of the example a model is traced with; every axis stays dynamic
TRACE_PAST = 3  # cached tokens before a decoder's trace example: a non-empty past keeps the cache path general
POSITION_IDS, PAST, PRESENT = "position_ids", "past_key_values", "present"
TOKEN_AXES = {0: "batch", 1: "sequence"}


@dataclass(frozen=True)
class ModelGraph:
    """Input and output names, and dynamic axes, of the ONNX graph a member ships."""

    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def is_past(name: str) -> bool:
    return name.startswith(f"{PAST}.")


def past_name(present: str) -> str:
    """The input a present output is fed back to: present.3.key -> past_key_values.3.key."""
    return PAST + present[len(PRESENT):]


def model_graph(model: nn.Module, kind: ModelKind, names: list[str]) -> ModelGraph:
    """The graph of a member: the tokenizer's inputs and the model's output; a model that generates
    (a causal LM) also takes positions and its KV cache (per layer, batch x kv_heads x past_sequence x
    head_dim, the pruned layer's own head count and width) and returns the cache grown by the new tokens."""
    if not kind.generates:
        output = kind.output_name
        axes = {**{name: TOKEN_AXES for name in names}, output: dict(enumerate(kind.output_axes))}
        return ModelGraph(names, [output], axes)
    if "attention_mask" not in names:
        raise UserError(f"a causal LM's model.onnx takes an attention_mask, and its tokenizer gives only {names}")
    layers = model_shape(model.config).num_layers
    past, present = cache_names(PAST, layers), cache_names(PRESENT, layers)
    axes = {**{name: TOKEN_AXES for name in [*names, POSITION_IDS, "logits"]},
            "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
            **{name: {0: "batch", 2: "past_sequence"} for name in past},
            **{name: {0: "batch", 2: "past_sequence + sequence"} for name in present}}
    return ModelGraph([*names, POSITION_IDS, *past], ["logits", *present], axes)


def forward_with_cache(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A causal LM's forward from its graph's inputs: (logits, every layer's keys and values after
    the new tokens). The cache is built here from the past inputs, so the tracer records them as
    graph inputs, and passed by whatever name the model's forward gives it."""
    past = [tensor for name, tensor in inputs.items() if is_past(name)]
    tokens = {name: tensor for name, tensor in inputs.items() if not is_past(name)}
    output = model(**tokens, **{cache_argument(model): cache_from_tensors(past)}, use_cache=True)
    return (output.logits, *cache_tensors(find_cache(output)[1]))


def position_ids(mask):
    """Positions as HF generate counts them from a (batch, tokens) mask, tensor or array: the
    attended tokens 0, 1, 2, ..., padding 0. Left padding shifts nothing."""
    return (mask.cumsum(-1) - 1) * (mask != 0)


def filled_cache(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every layer's keys and values after the model's forward over `inputs` from an empty cache."""
    with torch.no_grad():
        return forward_with_cache(model, inputs)[1:]


def decoder_example(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A causal LM's trace example: TRACE_SHAPE new tokens (one padded) after TRACE_PAST cached ones,
    whose cache the model itself makes, so each layer's past has that layer's pruned shape."""
    batch, seq = TRACE_SHAPE
    tokens = padded_for_tracing(random_inputs(model, names, batch, TRACE_PAST + seq))
    mask = tokens["attention_mask"]
    past = filled_cache(model, {name: tensor[:, :TRACE_PAST] for name, tensor in tokens.items()})
    return {**{name: tensor[:, TRACE_PAST:] for name, tensor in tokens.items()}, "attention_mask": mask,
            POSITION_IDS: position_ids(mask)[:, TRACE_PAST:], **dict(zip(cache_names(PAST, len(past) // 2), past))}


def export_model_onnx(model: nn.Module, kind: ModelKind, names: list[str], path: Path) -> Path:
    """The ONNX file a family member ships with (`model_graph`), every batch and sequence axis
    dynamic. The verifier and the profiler time files made here, so what they measure is what a
    user deploys (a static-shape export of dense MiniLM ran 6-12% slower in ONNX Runtime)."""
    graph = model_graph(model, kind, names)
    if kind.generates:
        call, example = TensorCall(model, graph.inputs, forward_with_cache), decoder_example(model, names)
    else:
        call, example = model_call(model, kind, names), padded_for_tracing(random_inputs(model, names, *TRACE_SHAPE))
    return export_onnx(call, example, path, graph.outputs, graph.dynamic_axes)


def symbolic_axes(inputs: dict[str, torch.Tensor], output: torch.Tensor, spec: InferenceSpec) -> dict[str, dict[int, str]]:
    """Dynamic axes for a block export, as a deployed model has them: every axis the size of the
    spec's batch is `batch`, every one the size of its sequence is `sequence`, and in decode mode
    the cached context and the mask over it are `past_sequence` and `past_sequence + sequence`. The
    block is only ever run at the spec's shape, so an axis named by coincidence costs nothing."""
    sizes = {spec.batch_size: "batch", spec.tokens: "sequence"}
    if spec.mode == "decode":
        sizes |= {spec.context: "past_sequence", spec.context + spec.tokens: "past_sequence + sequence"}

    def axes(tensor):
        return {axis: sizes[size] for axis, size in enumerate(tensor.shape) if size in sizes}
    return {**{name: axes(tensor) for name, tensor in inputs.items()}, "output": axes(output)}


@contextlib.contextmanager
def eager_attention(module: nn.Module):
    """Export with eager attention: the TorchScript exporter cannot convert SDPA with grouped-query
    heads (enable_gqa). Restores each config's implementation afterwards."""
    configs = {id(m.config): m.config for m in module.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


def export_onnx(call: TensorCall, inputs: dict[str, torch.Tensor], path: Path, output_names: list[str],
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> Path:
    """Export with the TorchScript exporter (dynamo=False), which handles these wrappers on torch 2.x.

    Every named input stays a graph input, even one the graph never reads (a model with all its
    attention removed ignores the mask): callers feed what the tokenizer gives them."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings(), eager_attention(call):
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        torch.onnx.export(
            call.eval(), tuple(inputs[name] for name in call.names), str(path),
            input_names=call.names, output_names=output_names, dynamic_axes=dynamic_axes,
            opset_version=OPSET, dynamo=False,
        )
    restore_unused_inputs(path, {n: inputs[n] for n in call.names}, dynamic_axes or {})
    return path


def restore_unused_inputs(path: Path, inputs: dict[str, torch.Tensor], dynamic_axes: dict[str, dict[int, str]]) -> None:
    import onnx
    from onnx.helper import make_tensor_value_info, np_dtype_to_tensor_dtype

    model = onnx.load(str(path))
    present = {v.name: v for v in model.graph.input}
    if set(inputs) <= set(present):
        return
    ordered = []
    for name, tensor in inputs.items():
        if name in present:
            ordered.append(present[name])
        else:
            shape = [dynamic_axes.get(name, {}).get(axis, size) for axis, size in enumerate(tensor.shape)]
            dtype = np_dtype_to_tensor_dtype(tensor.detach().cpu().numpy().dtype)
            ordered.append(make_tensor_value_info(name, dtype, shape))
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    onnx.save(model, str(path))


def ort_session(path: Path, spec: InferenceSpec):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle sessions' threads spin-wait for work; with many sessions timed interleaved, they steal
    # the cores of the session being timed (blocks measured 2x slower than inside the whole model).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if spec.device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def torch_dtype(spec: InferenceSpec) -> torch.dtype:
    return getattr(torch, spec.dtype)


def padded_for_tracing(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same inputs with the last position of the first row masked out.

    Tracing freezes Python branches: traced with an all-ones mask, a model may take the
    no-mask shortcut and export a graph that ignores padding for good."""
    if "attention_mask" not in inputs:
        return inputs
    mask = inputs["attention_mask"].clone()
    mask[0, -1] = 0
    return {**inputs, "attention_mask": mask}


ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def as_array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def derived_input(name: str) -> bool:
    """Whether `graph_feeds` makes this input when a caller does not give it."""
    return name in (POSITION_IDS, "token_type_ids") or is_past(name)


def graph_feeds(session, inputs: dict) -> dict[str, np.ndarray]:
    """Every input of the session's graph from `inputs` (tensors or arrays, by name). Those not given
    are what torch would use: token_type_ids zeros, and for a causal LM positions (counted from the
    mask as HF generate counts them) and a KV cache of the tokens the mask covers before the new
    ones: empty for a prefill, `context` long for a decode step (zeros: a timing does not depend on
    the cached values)."""
    arrays = {name: as_array(value) for name, value in inputs.items()}

    def made(node) -> np.ndarray:
        ids = arrays["input_ids"]  # (batch, sequence)
        if node.name == POSITION_IDS:
            return position_ids(arrays["attention_mask"])[:, -ids.shape[1]:]
        if node.name == "token_type_ids":
            return np.zeros_like(ids)
        if is_past(node.name):  # (batch, kv_heads, past, head_dim): the layer's static dims from the graph
            past = arrays["attention_mask"].shape[1] - ids.shape[1]
            return np.zeros((len(ids), node.shape[1], past, node.shape[3]), ORT_FLOATS[node.type])
        raise KeyError(node.name)
    return {node.name: arrays[node.name] if node.name in arrays else made(node) for node in session.get_inputs()}


def decoder_step(session, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call of a causal LM's graph: its logits, and its present cache named as the next call's past."""
    logits, *present = session.run(None, feeds)
    return logits, {past_name(node.name): array for node, array in zip(session.get_outputs()[1:], present)}


def next_token_feeds(feeds: dict[str, np.ndarray], tokens: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds for one new token per row after `feeds`, as HF generate makes them: the mask grows by an
    attended token, each row's position is its last one + 1."""
    mask = feeds["attention_mask"]
    return {**feeds, "input_ids": tokens[:, None].astype(np.int64),
            "attention_mask": np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1),
            POSITION_IDS: feeds[POSITION_IDS][:, -1:] + 1, **past}


def onnx_runner(path: Path, inputs: dict[str, torch.Tensor], spec: InferenceSpec) -> Callable[[], object]:
    """A no-argument callable running the ONNX file at `path` once on `inputs` in ONNX Runtime (a
    causal LM's file as a prefill: `graph_feeds` adds its positions and empty cache)."""
    session = ort_session(path, spec)
    feeds = graph_feeds(session, inputs)
    return lambda: session.run(None, feeds)


# --- the registry: how each backend runs what is timed and what is scored -------------------------

Runner = Callable[[], object]  # runs the timed thing once
MODEL_ONNX, MODEL_GGUF, MODEL_WEIGHTS = MEMBER_ONNX, MEMBER_GGUF, "model.safetensors"  # a member's files


def at_spec_dtype(call: TensorCall, inputs: dict[str, torch.Tensor],
                  spec: InferenceSpec) -> tuple[TensorCall, dict[str, torch.Tensor]]:
    """`call` and its floating inputs in the spec's dtype."""
    dtype = torch_dtype(spec)
    if dtype != torch.float32 or spec.device != "cpu":
        call = copy.deepcopy(call)  # Module.to converts in place: leave the caller's model as it is
    call = call.to(dtype=dtype)
    return call, {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}


def torch_block_runner(call: TensorCall, inputs: dict[str, torch.Tensor], spec: InferenceSpec, workdir: Path,
                       name: str) -> Runner:
    """`call` run eagerly on the spec's device."""
    call, inputs = at_spec_dtype(call, inputs, spec)
    call = call.to(device=spec.device)
    args = tuple(inputs[n].to(spec.device) for n in call.names)

    def run():
        with torch.inference_mode():
            return call(*args)
    return run


def onnx_block_runner(call: TensorCall, inputs: dict[str, torch.Tensor], spec: InferenceSpec, workdir: Path,
                      name: str) -> Runner:
    """`call` exported to `workdir/{name}.onnx` with the dynamic axes a deployed model has, run in ONNX Runtime."""
    call, inputs = at_spec_dtype(call, inputs, spec)
    with torch.inference_mode():
        output = call(*(inputs[n] for n in call.names))
    path = export_onnx(call, padded_for_tracing(inputs), workdir / f"{name}.onnx", ["output"],
                       symbolic_axes({n: inputs[n] for n in call.names}, output, spec))
    return onnx_runner(path, inputs, spec)


def torch_module_runner(model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path, name: str) -> Runner:
    return torch_block_runner(work.call(model), work.inputs, spec, workdir, name)


def onnx_file(model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path, name: str) -> Path:
    """The model.onnx a member ships with."""
    return export_model_onnx(model, work.kind, work.names, workdir / f"{name}.onnx")


def onnx_file_runner(path: Path, work: Workload, spec: InferenceSpec) -> Runner:
    return onnx_runner(path, work.inputs, spec)


def torch_member_runner(folder: Path, model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path,
                        name: str) -> Runner:
    return torch_module_runner(model, work, spec, workdir, name)


def onnx_member_runner(folder: Path, model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path,
                       name: str) -> Runner:
    if not (folder / MODEL_ONNX).is_file():
        raise UserError(f"member {folder} has no {MODEL_ONNX}: the family was made with --no-onnx")
    return onnx_runner(folder / MODEL_ONNX, work.inputs, spec)


# evaluate and export build on this module: their forwards and loader are imported when a member is scored.

def torch_member_forward(folder: Path, kind: ModelKind) -> Callable:
    from .evaluate import torch_forward
    from .export import load_pruned

    return torch_forward(load_pruned(folder), kind)


def onnx_member_forward(folder: Path, kind: ModelKind) -> Callable:
    from .evaluate import onnx_forward

    return onnx_forward(folder / MODEL_ONNX)


# llama.cpp runs GGUF files: a whole model, never a lone block (the profiler times blocks stacked).

def gguf_runner(path: Path, work: Workload, spec: InferenceSpec) -> Runner:
    """The GGUF file at `path` run in llama.cpp on the workload's sequence, as the spec serves it."""
    from .llamacpp import repacks, timed_call

    return timed_call(path, spec.mode, work.tokens, spec.threads, repacks(spec.gguf_type), spec.device == "cuda")


def gguf_file(model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path, name: str) -> Path:
    """The model.gguf a member ships with, at the spec's weight type, with the source's tokenizer."""
    from .gguf_export import write_gguf

    return write_gguf(model, workdir / f"{name}.gguf", work.vocabulary, spec.gguf_type)


def member_gguf(folder: Path) -> Path:
    if not (folder / MODEL_GGUF).is_file():
        raise UserError(f"member {folder} has no {MODEL_GGUF}: write it with `ziplm-planner export-gguf`")
    return folder / MODEL_GGUF


def llamacpp_member_runner(folder: Path, model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path,
                           name: str) -> Runner:
    return gguf_runner(member_gguf(folder), work, spec)


def llamacpp_member_forward(folder: Path, kind: ModelKind) -> Callable:
    from .llamacpp import gguf_forward

    if not kind.generates:
        raise UserError(f"llama.cpp runs causal LMs, and {folder} is a {kind.name} member: score it with torch or onnx")
    return gguf_forward(member_gguf(folder))


def cuda_synchronizer(spec: InferenceSpec) -> Callable[[], None] | None:
    return torch.cuda.synchronize if spec.device == "cuda" else None


def no_synchronizer(spec: InferenceSpec) -> None:
    """ONNX Runtime and llama.cpp return once their outputs are on the host: nothing to wait for."""
    return None


@dataclass(frozen=True)
class Backend:
    """A runtime members deploy on, and everything the profiler, the verifier, `verify` and `evaluate`
    do with it, so that none of them switches on its name (the dtypes it times are checked by
    `InferenceSpec`, which the CLI reads without torch).

    Runners take (what to run, ..., spec, workdir, name): a block's `TensorCall` and inputs; a shipped
    member folder with its reloaded model and workload. A whole model runs as it deploys
    (`model_runner`): a backend that ships a file of its own writes it with `file` and runs it with
    `file_runner` (the verifier times such files in a process of their own); torch runs the module
    (`module_runner`). `member_forward(folder, kind)` is what evaluate scores the member with. A
    backend without a `block_runner` runs whole models only (llama.cpp): the profiler times its blocks
    stacked (`runs_whole_models_only`)."""

    name: str
    timed: str  # what a member's timing runs, as reports name it
    member_file: str  # the file of a member folder the backend runs
    block_runner: Callable[[TensorCall, dict[str, torch.Tensor], InferenceSpec, Path, str], Runner] | None
    member_runner: Callable[[Path, nn.Module, Workload, InferenceSpec, Path, str], Runner]
    member_forward: Callable[[Path, ModelKind], Callable]
    synchronizer: Callable[[InferenceSpec], Callable[[], None] | None]  # waited on before a clock is read
    module_runner: Callable[[nn.Module, Workload, InferenceSpec, Path, str], Runner] | None = None
    file: Callable[[nn.Module, Workload, InferenceSpec, Path, str], Path] | None = None
    file_runner: Callable[[Path, Workload, InferenceSpec], Runner] | None = None

    @property
    def runs_whole_models_only(self) -> bool:
        return self.block_runner is None

    def model_runner(self, model: nn.Module, work: Workload, spec: InferenceSpec, workdir: Path,
                     name: str) -> tuple[Runner, Path | None]:
        """`model` run as it deploys, and the file run: the backend's own, written and loaded (returned,
        so the very file timed can ship), or None where torch runs the module."""
        if self.file is None:
            return self.module_runner(model, work, spec, workdir, name), None
        path = self.file(model, work, spec, workdir, name)
        return self.file_runner(path, work, spec), path


BACKENDS = {backend.name: backend for backend in (
    Backend("torch", "torch module", MODEL_WEIGHTS, torch_block_runner, torch_member_runner, torch_member_forward,
            cuda_synchronizer, module_runner=torch_module_runner),
    Backend("onnxruntime", MODEL_ONNX, MODEL_ONNX, onnx_block_runner, onnx_member_runner, onnx_member_forward,
            no_synchronizer, file=onnx_file, file_runner=onnx_file_runner),
    Backend("llamacpp", MODEL_GGUF, MODEL_GGUF, None, llamacpp_member_runner, llamacpp_member_forward,
            no_synchronizer, file=gguf_file, file_runner=gguf_runner),
)}
ALIASES = {"onnx": "onnxruntime"}  # names evaluate also accepts


def backend_named(name: str) -> Backend:
    try:
        return BACKENDS[ALIASES.get(name, name)]
    except KeyError:
        raise UserError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}") from None


def backend_for(spec: InferenceSpec) -> Backend:
    return BACKENDS[spec.backend]
