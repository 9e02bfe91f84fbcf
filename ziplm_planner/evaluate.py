"""Scores of a family's members on held-out data, from the torch model or from the ONNX file.

Tasks (`TASKS`): STS-B Spearman for embedding models, accuracy and macro-F1 for sequence
classifiers, perplexity for causal LMs, and fidelity to the dense member for any model.

Every score is computed from a `Forward`: a callable from a batch of named tensors (as the
tokenizer names them) to the model's deployed output, `last_hidden_state` for embedding models
and `logits` otherwise. `torch_forward` and `onnx_forward` build one from a model or from a
member's `model.onnx`, so both backends go through the same scoring code.

Fidelity is the mean cosine similarity between a member's pooled outputs and the dense
member's: mean-pooled last hidden states (embedding models, one value per text), class
distributions (classifiers, per text) and next-token distributions (causal LMs, per real token).
Causal LMs are compared on their next-token distributions, not on hidden states, because the
ONNX graph returns logits only and both backends must give the same score.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from scipy.stats import spearmanr
from torch import nn

from .atomic import atomic_write_text
from .backends import Backend, backend_named, derived_input, graph_feeds, ort_session
from .data import TextDataset, read_dataset, right_padding, sentences
from .errors import UserError
from .cards import write_cards
from .family import read_report, report_csv
from .export import ONNX, PRUNING, load_pruned_tokenizer, read_record
from .kinds import (CAUSAL_LM, CLASSIFICATION, EMBEDDING, KINDS, ModelKind, kind_named, max_positions, mean_pool,
                    perplexity_window)
from .progress import bar, stage
from .settings import PERPLEXITY_SEQ_LEN
from .spec import InferenceSpec

log = logging.getLogger(__name__)

BATCH_SIZE = 32  # texts per forward
MAX_LENGTH = 128  # tokens per text (STS-B, classification, fidelity)
PERPLEXITY_BATCH = 4  # windows per forward

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]
Scorer = Callable[[Forward], dict[str, float]]


# --- forwards -----------------------------------------------------------------------------------


def torch_forward(model: nn.Module, kind: ModelKind) -> Forward:
    """The model's deployed output (`kind.output`: last_hidden_state or logits) as float32 on the CPU.

    Inputs the model's forward does not name (token_type_ids for a Llama) are dropped."""
    call = kind.output
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {name: t.to(device) for name, t in batch.items() if name in accepted}
        with torch.inference_mode():
            return call(model, inputs).float().cpu()
    return forward


def onnx_forward(path: Path, spec: InferenceSpec = InferenceSpec()) -> Forward:
    """A member's ONNX file in ONNX Runtime, fed by the graph's input names; its first output.

    Inputs the batch lacks are fed what torch uses (`graph_feeds`): token_type_ids zeros, and a
    causal LM's prefill positions and empty KV cache."""
    session = ort_session(Path(path), spec)
    names = [i.name for i in session.get_inputs()]

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if missing := [n for n in names if n not in batch and not derived_input(n)]:
            raise UserError(f"{path} needs inputs {missing} that the tokenizer does not give")
        out = session.run(None, graph_feeds(session, batch))[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))
    return forward


def as_forward(model: nn.Module | Forward, kind: ModelKind) -> Forward:
    return torch_forward(model, kind) if isinstance(model, nn.Module) else model


# --- tokenising ---------------------------------------------------------------------------------


def _encode(tokenizer, first: Sequence[str], second: Sequence[str] | None = None,
            max_length: int = MAX_LENGTH) -> list[dict[str, torch.Tensor]]:
    """Tokenizer outputs, BATCH_SIZE texts (or pairs) a batch, right-padded to each batch's longest."""
    batches = []
    with right_padding(tokenizer):
        for i in range(0, len(first), BATCH_SIZE):
            texts = [first[i:i + BATCH_SIZE]] + ([] if second is None else [second[i:i + BATCH_SIZE]])
            batches.append(dict(tokenizer(*texts, padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt")))
    return batches


def _first_tokens(tokenizer, texts: list[str], max_tokens: int, max_length: int) -> list[str]:
    """The leading texts holding about `max_tokens` tokens (at least one text)."""
    lengths = [min(len(ids), max_length) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    total, count = 0, 0
    while count < len(texts) and total < max_tokens:
        total, count = total + lengths[count], count + 1
    return texts[:count]


def _windows(tokenizer, data: TextDataset, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """(windows, seq_len) ids: the text joined by blank lines, cut into non-overlapping windows; with
    `max_tokens`, max_tokens // seq_len of them at random (seed 0, as calibration draws them)."""
    ids = tokenizer("\n\n".join(data.texts), add_special_tokens=False, verbose=False)["input_ids"]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise UserError(f"{data.source} has {len(ids)} tokens, fewer than one window of {seq_len}: give more text")
    windows = torch.tensor(ids[:n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    if max_tokens is None:
        return windows
    wanted = max(1, max_tokens // seq_len)
    return windows[random.Random(0).sample(range(n_windows), min(wanted, n_windows))]


# --- the scores, over a Forward -----------------------------------------------------------------


def _embed(forward: Forward, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(texts, d) mean-pooled last hidden states."""
    return torch.cat([mean_pool(forward(b), b["attention_mask"]) for b in batches])


def _stsb_scorer(data: TextDataset, tokenizer, max_length: int = MAX_LENGTH) -> Scorer:
    first = _encode(tokenizer, [a for a, _ in data.pairs], max_length=max_length)
    second = _encode(tokenizer, [b for _, b in data.pairs], max_length=max_length)
    gold = np.asarray(data.labels, dtype=np.float64)

    def score(forward: Forward) -> dict[str, float]:
        cosine = F.cosine_similarity(_embed(forward, first), _embed(forward, second), dim=-1)
        return {"stsb": float(spearmanr(cosine.numpy(), gold).statistic * 100)}
    return score


def macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """Unweighted mean over the classes in either list of 2 TP / (2 TP + FP + FN)."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    classes = np.union1d(gold, predicted)
    f1 = [2 * np.sum((gold == c) & (predicted == c)) / (np.sum(gold == c) + np.sum(predicted == c)) for c in classes]
    return float(np.mean(f1))


def _classification_scorer(data: TextDataset, tokenizer, num_labels: int, max_length: int = MAX_LENGTH) -> Scorer:
    gold = np.asarray(data.labels, dtype=np.int64)
    if bad := [int(v) for v in gold if not 0 <= v < num_labels]:
        raise UserError(f"{data.source} has label {bad[0]}, but the model has {num_labels} classes "
                        f"(0 to {num_labels - 1}): is it the model's task?")
    if data.pairs is None:
        batches = _encode(tokenizer, data.texts, max_length=max_length)
    else:
        batches = _encode(tokenizer, [a for a, _ in data.pairs], [b for _, b in data.pairs], max_length)

    def score(forward: Forward) -> dict[str, float]:
        predicted = torch.cat([forward(b).argmax(dim=-1) for b in batches]).numpy()  # (texts,)
        return {"classification": float(np.mean(predicted == gold) * 100), "f1": macro_f1(gold, predicted) * 100}
    return score


def _perplexity_scorer(data: TextDataset, tokenizer, seq_len: int, max_tokens: int | None) -> Scorer:
    windows = _windows(tokenizer, data, seq_len, max_tokens)  # (windows, seq_len)

    def score(forward: Forward) -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(windows), PERPLEXITY_BATCH):
            ids = windows[i:i + PERPLEXITY_BATCH]
            logits = forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})  # (b, seq, vocab)
            # position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
        return {"perplexity": math.exp(total / count)}
    return score


def _pooled(forward: Forward, kind: ModelKind, batches: list[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
    return (kind.fidelity_pool(forward(b), b["attention_mask"]) for b in batches)


def _fidelity_scorer(reference: Forward, kind: ModelKind, batches: list[dict[str, torch.Tensor]]) -> Scorer:
    # one reference per token (a causal LM's: tokens x vocab per batch) is too large to keep: recomputed per member
    kept = None if kind.fidelity_per_token else list(_pooled(reference, kind, batches))

    def score(forward: Forward) -> dict[str, float]:
        expected = kept if kept is not None else _pooled(reference, kind, batches)
        total, count = 0.0, 0
        for actual, wanted in zip(_pooled(forward, kind, batches), expected):
            cosine = F.cosine_similarity(actual, wanted, dim=-1)
            total, count = total + float(cosine.double().sum()), count + len(cosine)
        return {"fidelity": total / count}
    return score


# --- data files, checked per task -----------------------------------------------------------------


def _read(path: str) -> TextDataset:
    if not Path(path).exists():
        raise UserError(f"data file {path} does not exist: check the path")
    return read_dataset(path)


def _stsb_data(path: str) -> TextDataset:
    data = _read(path)
    if data.pairs is None or data.labels is None:
        raise UserError(f"{path} has no scored sentence pairs: stsb needs an STS-B file (genre, file, year, id, "
                        "score, sentence1, sentence2; e.g. sts-dev.csv)")
    return data


def _classification_data(path: str) -> TextDataset:
    data = _read(path)
    if data.labels is None:
        raise UserError(f"{path} has no labels: classification needs a GLUE TSV whose header names sentence "
                        "(or sentence1 and sentence2) and label")
    if data.fmt != "glue" or not all(isinstance(v, int) for v in data.labels):
        raise UserError(f"{path} has scores, not class labels: classification needs a GLUE TSV with integer labels")
    return data


def _text_data(path: str) -> TextDataset:
    data = _read(path)
    if data.fmt != "text":
        raise UserError(f"{path} is tab-separated {data.fmt} data: perplexity needs running text "
                        "(a .txt or .raw file, one paragraph a line)")
    return data


# --- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str  # in row["scores"], and the CSV column score_<key>
    label: str  # for plots
    higher_is_better: bool


@dataclass(frozen=True)
class Member:
    """One family member, ready to score."""

    name: str
    kind: ModelKind
    config: object  # the dense config saved with the member
    tokenizer: object
    forward: Forward

    @property
    def max_length(self) -> int:
        return min(MAX_LENGTH, max_positions(self.config))


@dataclass(frozen=True)
class Task:
    name: str
    label: str
    higher_is_better: bool
    kinds: tuple[ModelKind, ...]  # the model kinds it can score
    needs: str  # the model it needs, for errors
    read: Callable[[str], TextDataset]  # reads the data file, refusing the wrong format
    prepare: Callable[[TextDataset, Member, int | None], Scorer]  # (data, dense, max_tokens): once per family
    extra: tuple[Metric, ...] = ()

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return (Metric(self.name, self.label, self.higher_is_better), *self.extra)


def _prepare_stsb(data: TextDataset, dense: Member, max_tokens: int | None) -> Scorer:
    return _stsb_scorer(data, dense.tokenizer, dense.max_length)


def _prepare_classification(data: TextDataset, dense: Member, max_tokens: int | None) -> Scorer:
    return _classification_scorer(data, dense.tokenizer, dense.config.num_labels, dense.max_length)


def _prepare_perplexity(data: TextDataset, dense: Member, max_tokens: int | None) -> Scorer:
    return _perplexity_scorer(data, dense.tokenizer, perplexity_window(dense.config), max_tokens)


def _prepare_fidelity(data: TextDataset, dense: Member, max_tokens: int | None) -> Scorer:
    texts = sentences(data)
    if max_tokens is not None:
        texts = _first_tokens(dense.tokenizer, texts, max_tokens, dense.max_length)
    return _fidelity_scorer(dense.forward, dense.kind, _encode(dense.tokenizer, texts, max_length=dense.max_length))


TASKS = {task.name: task for task in (
    Task("stsb", "STS-B Spearman x100", True, (EMBEDDING,), "an embedding model (mean-pooled hidden states)",
         _stsb_data, _prepare_stsb),
    Task("classification", "accuracy (%)", True, (CLASSIFICATION,),
         "a sequence-classification model (one with a classification head)", _classification_data,
         _prepare_classification, extra=(Metric("f1", "macro-F1 (%)", True),)),
    Task("perplexity", "perplexity", False, (CAUSAL_LM,), "a causal LM (a language-modelling head)", _text_data,
         _prepare_perplexity),
    Task("fidelity", "fidelity (cosine to dense)", True, KINDS, "any model",
         _read, _prepare_fidelity),
)}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]


# --- one model, in Python -------------------------------------------------------------------------


def stsb_spearman(model: nn.Module | Forward, tokenizer, path: str) -> float:
    """Spearman x 100 between cosine similarity of the pair's embeddings and the gold score."""
    return _stsb_scorer(_stsb_data(path), tokenizer)(as_forward(model, EMBEDDING))["stsb"]


def perplexity(model: nn.Module | Forward, tokenizer, path: str, seq_len: int = PERPLEXITY_SEQ_LEN,
               max_tokens: int | None = None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the text (max_tokens: a seeded sample)."""
    scorer = _perplexity_scorer(_text_data(path), tokenizer, seq_len, max_tokens)
    return scorer(as_forward(model, CAUSAL_LM))["perplexity"]


# --- a family -----------------------------------------------------------------------------------


def _required_files(backend: Backend) -> tuple[str, ...]:
    return (PRUNING, "config.json", "tokenizer_config.json", backend.member_file)


def _check_member(folder: Path, name: str, backend: Backend) -> ModelKind:
    """The member's kind, after checking that its folder has what `backend` needs."""
    path = folder / name
    if not path.is_dir():
        raise UserError(f"member {name} is missing: {path} does not exist; run `ziplm-planner compress` again")
    for required in _required_files(backend):
        if not (path / required).is_file():
            hint = " (compressed with --no-onnx? evaluate with backend torch)" if required == ONNX else ""
            raise UserError(f"member {name} is incomplete: {required} missing{hint}")
    return kind_named(read_record(path)["kind"])


def _load_member(folder: Path, name: str, kind: ModelKind, backend: Backend) -> Member:
    path = folder / name
    tokenizer = load_pruned_tokenizer(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"member {name} has an unreadable config.json: {str(err).splitlines()[0]}") from None
    return Member(name, kind, config, tokenizer, backend.member_forward(path, kind))


def _with_scores(report: dict, task: Task, scores: dict[str, dict[str, float]], meta: dict) -> dict:
    """A copy of the report with the scores in its rows and the metrics' descriptions in its metadata."""
    rows = [{**row, "scores": {**(row.get("scores") or {}), **scores.get(row["folder"], {})}}
            for row in report["members"]]
    metadata = dict(report.get("metadata") or {})
    metadata["scores_meta"] = {**(metadata.get("scores_meta") or {}), **{
        m.key: {"higher_is_better": m.higher_is_better, "label": m.label, "task": task.name, **meta}
        for m in task.metrics}}
    return {**report, "metadata": metadata, "members": rows}


def evaluate_family(folder: str | Path, task: str, data: str | Path, backend: str = "torch",
                    max_tokens: int | None = None) -> dict[str, float]:
    """Score the dense member and every member in report.json on `task`; returns {folder: score}.

    The scores go into report.json (row["scores"], metadata["scores_meta"]) and report.csv
    (score_<key> columns), both written only once every member is scored. max_tokens caps the
    tokens perplexity and fidelity read (other tasks score their whole file)."""
    spec, folder, data = task_named(task), Path(folder), str(data)
    backend = backend_named(backend)
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max tokens must be >= 1, got {max_tokens}")
    report = read_report(folder)
    names = list(dict.fromkeys(["dense", *(row["folder"] for row in report["members"])]))
    kinds = {name: _check_member(folder, name, backend) for name in names}
    if others := {n: k for n, k in kinds.items() if k != kinds["dense"]}:
        name, kind = next(iter(others.items()))
        raise UserError(f"member {name} is a {kind.name} model, the dense member a {kinds['dense'].name} one: "
                        "not one family; run `ziplm-planner compress` again")
    kind = kinds["dense"]
    if kind not in spec.kinds:
        fitting = [t.name for t in TASKS.values() if kind in t.kinds]
        raise UserError(f"task {spec.name} needs {spec.needs}, and {folder} holds {kind.description}: "
                        f"use {' or '.join(fitting)}")
    dataset = spec.read(data)

    with stage(f"evaluate {spec.name}", f"{len(names)} models of {folder} on {backend.name}, data {data}"):
        dense = _load_member(folder, "dense", kind, backend)
        scorer = spec.prepare(dataset, dense, max_tokens)
        scores = {}
        for name in bar(names, desc=f"evaluate {spec.name}"):
            member = dense if name == "dense" else _load_member(folder, name, kind, backend)
            scores[name] = scorer(member.forward)
            log.info("%s %s: %s", name, spec.name, ", ".join(f"{k} {v:.4f}" for k, v in scores[name].items()))

    meta = {"data": data, "backend": backend.name, **({"max_tokens": max_tokens} if max_tokens is not None else {})}
    updated = _with_scores(report, spec, scores, meta)
    csv_text, json_text = report_csv(updated["members"]), json.dumps(updated, indent=1)
    atomic_write_text(folder / "report.csv", csv_text)
    atomic_write_text(folder / "report.json", json_text)
    write_cards(folder)  # the members' cards show their quality
    return {name: values[spec.name] for name, values in scores.items()}


def retained(score: float, dense_score: float, task: str) -> float:
    """`score` as a share of the dense member's on `task` ("retained" in the benchmarks): above 1 is better
    than dense, whichever way the task's score runs."""
    return score / dense_score if task_named(task).higher_is_better else dense_score / score
