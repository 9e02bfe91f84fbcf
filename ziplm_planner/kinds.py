"""Kinds of model, as data: what a model computes, and all the planner does differently for it.

A kind is told by the model's head, the ending of its transformers class name (`kind_of`), as
architectures are told by `config.model_type` (adapters). Each `ModelKind` carries its Auto class,
its deployed output, how data is tokenised for it, its calibration loss (the model's own), its
per-sample Fisher loss and targets (fisher.py), its distillation terms (distill.py), how fidelity
pools its output (evaluate.py) and its training defaults. Its name is what pruning.json ("kind")
and the reports ("model_kind") record.

  causal LM       windows of running text; LM loss; next-token KL and LM loss; per-token fidelity
  classification  sentences, with labels where the data has them; task loss (else KL to the dense
                  model); class KL and task loss; class-distribution fidelity
  embedding       sentences; cosine distance of mean-pooled embeddings to the dense model's
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .adapters import architecture_for
from .data import TextDataset, TokenBatches, sample_rows, sentences, tokenize_sentences, tokenize_stream
from .errors import UserError
from .settings import CAUSAL_LM_DEFAULTS, OTHER_KIND_DEFAULTS, PERPLEXITY_SEQ_LEN, KindDefaults

IGNORED = -100  # a label cross-entropy skips: padding
TARGET_NOISE = 0.1  # embedding Fisher: std of the sampled target around the dense embedding, x its norm

Batch = dict[str, torch.Tensor]


# --- the math the kinds share -----------------------------------------------------------------


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, d) -> (batch, d): the sentence-transformers mean over real tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def lm_labels(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) the tokens as language-modelling labels, IGNORED on padding."""
    return input_ids.masked_fill(mask == 0, IGNORED)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over real tokens: position i predicts token i + 1."""
    targets = lm_labels(input_ids, mask)[:, 1:]
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORED)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 KL(teacher || student) of softened distributions, mean over real positions.

    logits: (batch, labels) for classifiers, (batch, seq, vocab) for causal LMs with mask (batch, seq)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # (batch[, seq])
    if mask is not None and per_position.dim() == 2:
        per_position = per_position[mask.bool()]
    return temperature ** 2 * per_position.mean()


def embedding_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between mean-pooled embeddings over real tokens: (batch, seq, hidden) each."""
    return (1 - F.cosine_similarity(mean_pool(student_hidden, mask), mean_pool(teacher_hidden, mask), dim=-1)).mean()


def pooled_last_layer(output, mask: torch.Tensor) -> torch.Tensor:
    """(batch, d): the mean over real tokens of the last layer's output (hidden_states[-1])."""
    return mean_pool(output.hidden_states[-1], mask)


def first_token_last_layer(output, mask: torch.Tensor) -> torch.Tensor:
    """(batch, d): the last layer's output at the first token ([CLS]), which a BERT classifier's head reads."""
    return output.hidden_states[-1][:, 0]


def max_positions(config) -> int:
    return int(getattr(config, "max_position_embeddings", None) or PERPLEXITY_SEQ_LEN)


def perplexity_window(config) -> int:
    """Tokens per perplexity window for a model of this config."""
    return min(PERPLEXITY_SEQ_LEN, max_positions(config))


def _inputs(batch: Batch) -> Batch:
    """A batch as the model takes it: without its labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def _sentences(tokenizer, dataset: TextDataset, seq_len: int, num_samples: int | None, seed: int,
               held_out: int = 0, labelled: bool = False) -> TokenBatches:
    """One sentence a sample (both sentences of a pair); `labelled`: single sentences keep their labels."""
    texts, rows = sentences(dataset), sample_rows(dataset, num_samples, seed, held_out)
    labels = dataset.labels if labelled and dataset.pairs is None else None
    return tokenize_sentences(tokenizer, [texts[i] for i in rows], seq_len,
                              None if labels is None else [labels[i] for i in rows])


def _calibration_length(config, calibration_length: int) -> int:
    return calibration_length


# --- causal LMs -------------------------------------------------------------------------------


def _next_token_logits(model: nn.Module, inputs: Batch) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits  # (batch, seq, vocab)


def _windows(tokenizer, dataset: TextDataset, seq_len: int, num_samples: int | None, seed: int,
             held_out: int = 0) -> TokenBatches:
    """Windows of running text: the texts, then the second sentence of each pair, joined."""
    texts = dataset.texts + [s for pair in dataset.pairs or [] for s in pair[1:]]
    return tokenize_stream(tokenizer, texts, seq_len, num_samples, seed, held_out)


def _window_length(config, calibration_length: int) -> int:
    """The windows its perplexity is scored on (512, capped at its positions; never fewer than the
    calibration's). A decoder reads more context than the profiled shape, and positions it never trains
    on stay as pruning left them: at 2x on SmolLM2, 512-token windows recovered 1.8 perplexity more than
    128-token ones at the same tokens and steps (BENCHMARKS)."""
    return max(perplexity_window(config), calibration_length)


def _no_reference(dense: nn.Module, batch: Batch) -> None:
    return None  # the LM loss needs no dense output


def _lm_calibration_loss(model: nn.Module, batch: Batch, reference: None) -> tuple[float, int]:
    labels = lm_labels(batch["input_ids"], batch["attention_mask"])
    tokens = int((labels[:, 1:] != IGNORED).sum())
    return float(model(**_inputs(batch), labels=labels, use_cache=False).loss) * tokens, tokens


def _real_next_tokens(dense: nn.Module, batch: Batch, generator: torch.Generator) -> None:
    return None  # the LM loss is on the text's own next tokens


def _lm_sample_losses(model: nn.Module, batch: Batch, target: None) -> torch.Tensor:
    """(batch,) mean next-token NLL over each sample's real tokens."""
    logits = _next_token_logits(model, _inputs(batch))
    labels = lm_labels(batch["input_ids"], batch["attention_mask"])[:, 1:]
    logits = logits[:, :-1].transpose(1, 2).to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, labels, reduction="none")  # (batch, seq - 1), 0 where IGNORED
    return nll.sum(1) / (labels != IGNORED).sum(1).clamp(min=1)


def _lm_terms(student, teacher, batch: Batch, temperature: float) -> dict[str, torch.Tensor]:
    mask = batch["attention_mask"]
    return {"kl": kl_divergence(student.logits, teacher.logits, temperature, mask),
            "task": causal_lm_loss(student.logits, batch["input_ids"], mask)}


def _next_token_distributions(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return output[mask.bool()].softmax(dim=-1)  # (real tokens, vocab)


# --- sequence classifiers ---------------------------------------------------------------------


def _logits(model: nn.Module, inputs: Batch) -> torch.Tensor:
    return model(**inputs).logits  # (batch, labels)


def _class_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    return _logits(model, _inputs(batch))


def _classification_loss(model: nn.Module, batch: Batch, reference: torch.Tensor) -> tuple[float, int]:
    """The task loss where the data has labels, else KL(dense || model); summed over the batch."""
    output = _class_logits(model, batch)
    if "labels" in batch:
        return float(F.cross_entropy(output, batch["labels"], reduction="sum")), len(output)
    kl = F.kl_div(F.log_softmax(output, -1), F.log_softmax(reference, -1), log_target=True, reduction="sum")
    return float(kl), len(output)


def _label_or_sampled_class(dense: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The label, else a class drawn from the dense model's softmax (the true Fisher)."""
    if "labels" in batch:
        return batch["labels"]
    probabilities = _class_logits(dense, batch).float().softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def _class_sample_losses(model: nn.Module, batch: Batch, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_class_logits(model, batch), target, reduction="none")  # (batch,)


def _classification_terms(student, teacher, batch: Batch, temperature: float) -> dict[str, torch.Tensor]:
    terms = {"kl": kl_divergence(student.logits, teacher.logits, temperature)}
    if "labels" in batch:
        terms["task"] = F.cross_entropy(student.logits.float(), batch["labels"])
    return terms


def _class_distributions(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return output.softmax(dim=-1)  # (texts, labels)


# --- embedding models -------------------------------------------------------------------------


def _last_hidden_state(model: nn.Module, inputs: Batch) -> torch.Tensor:
    return model(**inputs).last_hidden_state  # (batch, seq, d)


def _pooled_embedding(model: nn.Module, batch: Batch) -> torch.Tensor:
    return mean_pool(_last_hidden_state(model, _inputs(batch)), batch["attention_mask"])  # (batch, d)


def _embedding_loss(model: nn.Module, batch: Batch, reference: torch.Tensor) -> tuple[float, int]:
    output = _pooled_embedding(model, batch)
    return float((1 - F.cosine_similarity(output, reference, dim=-1)).sum()), len(output)


def _noisy_embedding(dense: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian draw around the dense embedding: a distance to the dense output itself has zero
    gradient at the dense model."""
    pooled = _pooled_embedding(dense, batch)  # (batch, d)
    noise = torch.randn(pooled.shape, generator=generator, dtype=pooled.dtype)
    scale = TARGET_NOISE * pooled.norm(dim=-1, keepdim=True) / math.sqrt(pooled.shape[-1])
    return pooled + scale * noise


def _embedding_sample_losses(model: nn.Module, batch: Batch, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(_pooled_embedding(model, batch), target, dim=-1)  # (batch,)


def _embedding_terms(student, teacher, batch: Batch, temperature: float) -> dict[str, torch.Tensor]:
    # no logits: the KL term is the distance of the pooled embeddings
    return {"kl": embedding_distance(student.last_hidden_state, teacher.last_hidden_state, batch["attention_mask"])}


# --- the kinds --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelKind:
    """One kind of model. Batches are tokenizer outputs, with `labels` where the data has them;
    model outputs in `distillation` carry hidden_states."""

    name: str  # what pruning.json and the reports record
    description: str  # "an embedding model", for messages
    heads: tuple[str, ...]  # endings of the transformers class names of this kind
    auto_class: type  # the transformers Auto class that loads it
    output_name: str  # its deployed output: the ONNX graph's output
    output_axes: tuple[str, ...]  # the output's dynamic axes, in order
    output: Callable[[nn.Module, Batch], torch.Tensor]  # (model, named inputs) -> the deployed output
    # writes text token by token: ships its KV cache in the ONNX graph, is timed in decode mode, and can
    # write its own training text
    generates: bool
    # (tokenizer, dataset, seq_len, num_samples, seed, held_out) -> samples: all of them in order for
    # num_samples None, else num_samples drawn and up to held_out more; calibration and training data alike
    tokenize: Callable[..., TokenBatches]
    training_length: Callable[[object, int], int]  # (config, calibration length) -> training tokens per sample
    calibration_reference: Callable[[nn.Module, Batch], torch.Tensor | None]  # (dense, batch) -> kept for the loss
    calibration_loss: Callable[[nn.Module, Batch, torch.Tensor | None], tuple[float, int]]  # -> (sum, count)
    fisher_target: Callable[[nn.Module, Batch, torch.Generator], torch.Tensor | None]  # (dense, batch, generator)
    fisher_losses: Callable[[nn.Module, Batch, torch.Tensor | None], torch.Tensor]  # -> (batch,) differentiable
    # (student output, teacher output, batch, temperature) -> the output term "kl", and "task" where there is one
    distillation: Callable[..., dict[str, torch.Tensor]]
    fidelity_pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, mask) -> vectors to compare
    fidelity_per_token: bool  # one vector per real token: too many to keep the dense model's
    # (output with hidden_states, mask) -> (batch, d): an example as CAP's contrastive term compares it
    representation: Callable[[object, torch.Tensor], torch.Tensor]
    defaults: KindDefaults  # recovery settings left to the model (settings.py)


CAUSAL_LM = ModelKind(
    name="causal-lm", description="a causal LM", heads=("ForCausalLM", "LMHeadModel"),
    auto_class=AutoModelForCausalLM, output_name="logits", output_axes=("batch", "sequence"),
    output=_next_token_logits, generates=True, tokenize=_windows, training_length=_window_length,
    calibration_reference=_no_reference, calibration_loss=_lm_calibration_loss, fisher_target=_real_next_tokens,
    fisher_losses=_lm_sample_losses, distillation=_lm_terms, fidelity_pool=_next_token_distributions,
    fidelity_per_token=True, representation=pooled_last_layer, defaults=CAUSAL_LM_DEFAULTS)
CLASSIFICATION = ModelKind(
    name="classification", description="a sequence-classification model", heads=("ForSequenceClassification",),
    auto_class=AutoModelForSequenceClassification, output_name="logits", output_axes=("batch",),
    output=_logits, generates=False, tokenize=partial(_sentences, labelled=True), training_length=_calibration_length,
    calibration_reference=_class_logits, calibration_loss=_classification_loss, fisher_target=_label_or_sampled_class,
    fisher_losses=_class_sample_losses, distillation=_classification_terms, fidelity_pool=_class_distributions,
    fidelity_per_token=False, representation=first_token_last_layer, defaults=OTHER_KIND_DEFAULTS)
EMBEDDING = ModelKind(
    name="embedding", description="an embedding model", heads=(),
    auto_class=AutoModel, output_name="last_hidden_state", output_axes=("batch", "sequence"),
    output=_last_hidden_state, generates=False, tokenize=_sentences, training_length=_calibration_length,
    calibration_reference=_pooled_embedding, calibration_loss=_embedding_loss, fisher_target=_noisy_embedding,
    fisher_losses=_embedding_sample_losses, distillation=_embedding_terms, fidelity_pool=mean_pool,
    fidelity_per_token=False, representation=pooled_last_layer, defaults=OTHER_KIND_DEFAULTS)

# In order of precedence: a config naming several heads is of the first kind; any other head embeds.
KINDS: tuple[ModelKind, ...] = (CAUSAL_LM, CLASSIFICATION, EMBEDDING)
_BY_NAME = {kind.name: kind for kind in KINDS}


def kind_named(name) -> ModelKind:
    """The kind pruning.json or a report names."""
    kind = _BY_NAME.get(name) if isinstance(name, str) else None
    if kind is None:
        raise UserError(f"unknown model kind {name!r}: known kinds are {', '.join(_BY_NAME)}")
    return kind


def kind_of(config_or_class_name) -> ModelKind:
    """The kind of a transformers class (by name), or of the model a config describes (its
    architectures; a GGUF config names none, and a pre-norm one is a causal LM)."""
    if isinstance(config_or_class_name, str):
        return next((kind for kind in KINDS if config_or_class_name.endswith(kind.heads)), EMBEDDING)
    names = config_or_class_name.architectures or []
    if not names and architecture_for(config_or_class_name).pre_norm:
        return CAUSAL_LM
    found = {kind_of(name) for name in names}
    return next(kind for kind in KINDS if kind in found or kind is EMBEDDING)
