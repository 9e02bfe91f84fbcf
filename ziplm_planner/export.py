"""Family members on disk: a pruned model's folder, its checks, and the loader that rebuilds it.

A member folder holds the pruned weights (`model.safetensors`), the ORIGINAL dense config
(configs validate hidden_size % heads, so no config can describe a pruned model), the
tokenizer, `pruning.json` (the plan: the recorded surgery) and a checked `model.onnx`.
`load_pruned` rebuilds it with transformers: dense architecture, surgery, weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from .adapters import SUPPORTED_MODEL_TYPES
from .aliases import MEMBER_RECORD
from .atomic import usual_permissions
from .backends import (MODEL_GGUF, MODEL_ONNX, MODEL_WEIGHTS, PAST, as_array, decoder_step, export_model_onnx,
                       filled_cache, graph_feeds, input_names, is_past, model_graph, next_token_feeds, ort_session,
                       random_inputs)
from .errors import UserError
from .kinds import ModelKind, kind_named
from .portable import copy_source_files, dense_config, write_config
from .progress import stage
from .spec import InferenceSpec
from .surgery import PruningPlan, build_pruned, count_parameters

log = logging.getLogger(__name__)

FORMAT = "ziplm-planner/member/v1"
WEIGHTS, ONNX = MODEL_WEIGHTS, MODEL_ONNX  # the files a backend runs (backends.py)
TIMED_FILES = {".onnx": ONNX, ".gguf": MODEL_GGUF}  # a timed file's name in the member, by its suffix
PRUNING, MEASUREMENT = MEMBER_RECORD, "measurement.json"
CHECK_SHAPE = (3, 12)  # (batch, sequence): the check runs at another size than the trace (TRACE_SHAPE)
TOLERANCE = 1e-3  # of the ONNX file's and the reloaded member's outputs, times the output's largest magnitude (>= 1)


# --- checks -----------------------------------------------------------------------------------


def _max_diff(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None and expected.dim() >= 3:  # per-token outputs: padded positions are undefined
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    return float((actual.float() - expected.float()).abs().max())


def _check_batch(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    inputs = random_inputs(model, names, *CHECK_SHAPE, seed=1)
    if "attention_mask" in inputs:
        inputs["attention_mask"][1, -4:] = 0  # padding in one row
    return inputs


def _graph_dims(path: Path) -> tuple[list[str], list[str], dict[str, list]]:
    """Input names, output names and every input's and output's dims (a name where dynamic) of a graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    return [v.name for v in graph.input], [v.name for v in graph.output], dims


def _cached_logits(session, model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> np.ndarray:
    """A causal LM's logits for `inputs` in two calls, the second fed the first's present as its past:
    the prefill and the decode path of generation. Raises when a present's shape is not torch's cache's."""
    split = inputs["input_ids"].shape[1] // 2
    first, past = decoder_step(session, graph_feeds(session, {n: t[:, :split] for n, t in inputs.items()}))
    rest = {**{n: t[:, split:] for n, t in inputs.items()}, "attention_mask": inputs["attention_mask"], **past}
    second, present = decoder_step(session, graph_feeds(session, rest))
    found, expected = [a.shape for a in present.values()], [tuple(t.shape) for t in filled_cache(model, inputs)]
    if found != expected:
        raise RuntimeError(f"ONNX export of {path}: present shapes {found}, torch's cache has {expected}")
    return np.concatenate([first, second], axis=1)


def check_onnx(path: Path, model: nn.Module, kind: ModelKind, names: list[str], tolerance: float) -> dict:
    """Graph input/output names and dynamic axes, and ONNX Runtime vs torch at an untraced size (a
    generating model's file also fed its own cache, and its cache's shapes compared with torch's)."""
    expected = model_graph(model, kind, names)
    found_inputs, found_outputs, dims = _graph_dims(path)
    axes = {name: {axis: dims[name][axis] for axis in wanted} for name, wanted in expected.dynamic_axes.items() if name in dims}
    if found_inputs != expected.inputs or found_outputs != expected.outputs or axes != expected.dynamic_axes:
        raise RuntimeError(f"ONNX export of {path}: inputs {found_inputs}, outputs {found_outputs}, axes {axes}; "
                           f"expected {expected.inputs}, {expected.outputs}, {expected.dynamic_axes}")
    inputs = _check_batch(model, names)
    session = ort_session(path, InferenceSpec())
    actual = _cached_logits(session, model, inputs, path) if kind.generates \
        else session.run(None, graph_feeds(session, inputs))[0]
    with torch.no_grad():
        reference = kind.output(model, inputs).cpu()
    diff = _max_diff(torch.from_numpy(np.asarray(actual)), reference, inputs.get("attention_mask"))
    # relative to the output's scale: float32 round-off over many layers grows with it (LM logits ~ 20)
    allowed = tolerance * max(1.0, float(reference.abs().max()))
    if not diff <= allowed:
        raise RuntimeError(f"ONNX export of {path} differs from torch by {diff:.3g} (allowed {allowed:.3g})")
    return {"file": ONNX, "inputs": expected.inputs, "outputs": expected.outputs, "dynamic_axes": expected.dynamic_axes,
            "checked_shape": list(CHECK_SHAPE), "max_abs_diff": diff, "allowed_abs_diff": allowed}


def check_reload(folder: Path, model: nn.Module, kind: ModelKind, names: list[str], tolerance: float) -> float:
    """Rebuild the member from `folder` alone and compare it with `model`; returns the max abs diff."""
    forward = kind.output
    inputs = _check_batch(model, names)
    reloaded = load_pruned(folder).to(next(model.parameters()).device)
    with torch.no_grad():
        diff = _max_diff(forward(reloaded, inputs), forward(model.eval(), inputs), inputs.get("attention_mask"))
    if count_parameters(reloaded) != count_parameters(model) or not diff <= tolerance:
        raise RuntimeError(f"member reloaded from {folder} differs from the model saved (max abs diff {diff:.3g}, "
                           f"{count_parameters(reloaded)} vs {count_parameters(model)} parameters)")
    return diff


# --- saving -----------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the complete `tmp` onto `folder`; an old `folder` is moved aside first, removed last."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    folder.rename(old / "member")
    try:
        tmp.rename(folder)
    except BaseException:
        (old / "member").rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_member(folder: Path, model: nn.Module, tokenizer, plan: PruningPlan, kind: ModelKind, info: dict,
                onnx: bool = True, timed_file: Path | None = None, measurement: dict | None = None,
                source: Path | None = None) -> dict:
    """Write one family member folder, checked, all at once (built in a temporary sibling, then renamed).

    `timed_file`, when given, is the model's file already made and timed (`export_model_onnx`'s
    model.onnx, or gguf_export's model.gguf, named by its suffix): it ships as it is; `measurement` (how
    it was timed) goes to measurement.json. A `source` folder gives its sentence-transformers modules and
    licence files (portable.py). Every save is checked:
    the folder is reloaded with `load_pruned` and the ONNX file run in ONNX Runtime, both compared with
    `model` (TOLERANCE). Returns pruning.json's dict."""
    folder = Path(folder)
    if clash := {"format", "kind", "model_class", "plan", "parameters", "auto_class", "remote_code", "onnx",
                 "reload_max_abs_diff"} & info.keys():
        raise ValueError(f"info would overwrite pruning.json fields {sorted(clash)}")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot write member {folder}: a file of that name exists")
    names = input_names(model, tokenizer)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    except OSError as err:
        raise UserError(f"cannot write member {folder}: {err.strerror or err}") from None
    try:
        with stage(f"export {folder.name}", f"weights{', ONNX' if onnx else ''} and their checks, to {folder}"):
            save_model(model, str(tmp / WEIGHTS))  # drops tied duplicates, recorded in the file's metadata
            remote_code = write_config(tmp, model, plan, kind)
            if source is not None:
                copy_source_files(source, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            record = {"format": FORMAT, "kind": kind.name, "model_class": type(model).__name__, "plan": plan.to_dict(),
                      "parameters": count_parameters(model), "auto_class": kind.auto_class.__name__,
                      "remote_code": remote_code, **info, "onnx": None}
            if timed_file is not None:
                shutil.copyfile(timed_file, tmp / TIMED_FILES[timed_file.suffix])
            if onnx:
                if not (tmp / ONNX).is_file():
                    export_model_onnx(model, kind, names, tmp / ONNX)
                record["onnx"] = check_onnx(tmp / ONNX, model, kind, names, TOLERANCE)
            if measurement is not None:
                _write_json(tmp / MEASUREMENT, measurement)
            _write_json(tmp / PRUNING, record)
            record["reload_max_abs_diff"] = check_reload(tmp, model, kind, names, TOLERANCE)
            _write_json(tmp / PRUNING, record)
            usual_permissions(tmp)
            _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%d parameters%s)", folder, record["parameters"], ", ONNX checked" if onnx else "")
    return record


# --- loading ----------------------------------------------------------------------------------


def read_record(folder: Path) -> dict:
    """pruning.json of a member folder, validated; UserError for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    if not (folder / PRUNING).is_file():
        if (folder / "report.json").is_file():
            members = sorted(p.name for p in folder.iterdir() if (p / PRUNING).is_file())
            raise UserError(f"{folder} is a family folder: give one of its members ({', '.join(members)})")
        raise UserError(f"{folder} is not a ziplm-planner model folder: {PRUNING} missing")
    try:
        record = json.loads((folder / PRUNING).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{folder / PRUNING} is corrupt: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{folder / PRUNING} is not a ziplm-planner member file (expected format {FORMAT})")
    try:
        kind_named(record.get("kind"))
    except UserError:
        raise UserError(f"{folder / PRUNING} has an unknown model kind {record.get('kind')!r}") from None
    return record


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """State dict with tied tensors restored: save_model keeps one name, the others are in the metadata."""
    with safe_open(str(path), framework="pt") as handle:
        aliases = handle.metadata() or {}
    state = load_file(str(path))
    return {**state, **{alias: state[kept] for alias, kept in aliases.items() if kept in state}}


def check_model_type(folder: Path, plan: PruningPlan) -> None:
    """config.json names the architecture its pruning plan was made for, and one this package supports."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"member {folder} is corrupt: config.json is not a config ({err})") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"member {folder} is a {model_type!r} model, an architecture ziplm-planner does not support "
                        f"({', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type != plan.shape.model_type:
        raise UserError(f"member {folder}: config.json is a {model_type} model and its pruning plan a "
                        f"{plan.shape.model_type} one (the folder was edited): save the member again")


def load_pruned(folder: Path) -> nn.Module:
    """Rebuild a saved member from its folder alone, in eval mode."""
    folder = Path(folder)
    record = read_record(folder)
    plan = PruningPlan.from_dict(record.get("plan"))
    for required in ("config.json", WEIGHTS):
        if not (folder / required).is_file():
            raise UserError(f"member {folder} is incomplete: {required} missing")
    cls = getattr(transformers, str(record.get("model_class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UserError(f"{folder / PRUNING} names an unknown model class {record.get('model_class')!r}")
    check_model_type(folder, plan)
    try:
        config = dense_config(transformers.AutoConfig.from_pretrained(folder), plan.shape)
        state = _load_weights(folder / WEIGHTS)
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"member {folder} is corrupt: {str(err).splitlines()[0]}") from None
    try:
        model = build_pruned(cls, config, plan, state)
    except RuntimeError as err:  # shape or key mismatch: weights from another plan or model
        raise UserError(f"member {folder}: weights do not match its pruning plan ({str(err).splitlines()[0]})") from None
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    return model.to(dtype) if dtype is not None else model  # built in float32, the weights' dtype is kept


def load_pruned_tokenizer(folder: Path):
    """The tokenizer saved with a member."""
    folder = Path(folder)
    read_record(folder)
    if not (folder / "tokenizer_config.json").is_file():  # else transformers 5 builds an empty tokenizer
        raise UserError(f"member {folder} has no tokenizer: tokenizer_config.json missing")
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"member {folder} has no usable tokenizer: {str(err).splitlines()[0]}") from None


# --- generating with the shipped file -------------------------------------------------------------


def _decoder_session(path: Path):
    """An ONNX Runtime session of a causal LM's model.onnx (the file, or the member folder holding it)."""
    path = Path(path)
    path = path / ONNX if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist")
    session = ort_session(path, InferenceSpec())
    if not any(is_past(node.name) for node in session.get_inputs()):
        raise UserError(f"{path} takes no KV cache ({PAST}.* inputs): generation needs a causal LM's model.onnx "
                        f"exported by this version")
    return session


def ort_generate(path: Path, input_ids, attention_mask, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy generation in ONNX Runtime with a causal-LM member's model.onnx, its present cache fed
    back as past: the token ids `model.generate(..., do_sample=False)` returns, prompt first,
    (batch, prompt + new). Inputs are (batch, prompt) tensors or arrays, padded on either side; positions
    are counted as HF generate counts them. With `eos_token_id`, a row that emitted it goes on with
    `pad_token_id` (default: the first eos id) and generation ends once every row has."""
    session = _decoder_session(path)
    ids, mask = as_array(input_ids).astype(np.int64), as_array(attention_mask).astype(np.int64)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise UserError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be (batch, prompt)")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = None if eos_token_id is None else np.atleast_1d(eos_token_id)
    pad = eos[0] if pad_token_id is None and eos is not None else pad_token_id
    finished = np.zeros(len(ids), dtype=bool)
    feeds = graph_feeds(session, {"input_ids": ids, "attention_mask": mask})
    for _ in range(max_new_tokens):
        logits, past = decoder_step(session, feeds)
        tokens = logits[:, -1].argmax(-1)
        if eos is not None:
            tokens = np.where(finished, pad, tokens)
            finished |= np.isin(tokens, eos)
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
        if finished.all():
            break
        feeds = next_token_feeds(feeds, tokens, past)
    return ids
