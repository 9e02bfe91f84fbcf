"""Calibration data and the calibration loss.

The loss is the model's own (DESIGN.md, "Search"): LM loss for causal LMs, task loss when a
classifier's data has labels (else KL to the dense model), and for sentence-embedding models
the cosine distance of mean-pooled embeddings to the dense model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import TokenBatches, calibration_texts, read_dataset, tokenize_sentences, tokenize_stream
from .errors import UserError
from .models import CAUSAL_LM, CLASSIFICATION, LoadedModel

BATCH_SIZE = 16


@dataclass
class Calibration:
    tokens: TokenBatches  # the samples the Hessians (and block Fisher) are computed on
    source: str
    seq_len: int
    held_out: TokenBatches | None = None  # samples of the same data the Hessians never saw

    def batches(self, limit: int | None = None, held_out: bool = False) -> list[dict[str, torch.Tensor]]:
        """Batches trimmed to their longest sample; the first `limit` samples if given. held_out: of
        the held-out samples, when there are any."""
        tokens = self.held_out if held_out and self.held_out is not None else self.tokens
        batches, seen = [], 0
        for batch in tokens.batches(BATCH_SIZE, trim=True):
            if limit is not None and seen >= limit:
                break
            batches.append(batch)
            seen += len(batch["input_ids"])
        return batches

    @property
    def num_samples(self) -> int:
        return len(self.tokens.input_ids)


def load_calibration(loaded: LoadedModel, path: str, seq_len: int, num_samples: int, seed: int = 0,
                     held_out: int = 0) -> Calibration:
    """Tokenise calibration data at the table's sequence length (windows of running text for LMs):
    `num_samples` samples, and up to `held_out` others of the same data, for scores that the
    Hessians' samples would flatter."""
    dataset = read_dataset(path)
    if loaded.kind == CAUSAL_LM:
        texts = dataset.texts + [s for pair in dataset.pairs or [] for s in pair[1:]]
        tokens = tokenize_stream(loaded.tokenizer, texts, seq_len, num_samples, seed, held_out)
    else:
        texts = calibration_texts(dataset, num_samples, seed, held_out)
        labels = None
        if loaded.kind == CLASSIFICATION and dataset.labels is not None and dataset.pairs is None:
            by_text = dict(zip(dataset.texts, dataset.labels))
            labels = [by_text[t] for t in texts]
        tokens = tokenize_sentences(loaded.tokenizer, texts, seq_len, labels)
    if tokens.num_tokens == 0:
        raise UserError(f"calibration data {path} holds no tokens")
    samples, unseen = tokens.split(num_samples)
    return Calibration(samples, str(path), seq_len, unseen)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, d) -> (batch, d): the sentence-transformers mean over real tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


class CalibrationLoss:
    """Scores a (pruned) model by its calibration loss; lower is better. The dense model's
    references are computed once."""

    def __init__(self, dense: nn.Module, kind: str, batches: list[dict[str, torch.Tensor]]):
        self.kind, self.batches = kind, batches
        self.references = [None] * len(batches)
        if kind != CAUSAL_LM:
            with torch.inference_mode():
                self.references = [self._output(dense, batch) for batch in batches]

    def _output(self, model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(**_model_inputs(batch))
        if self.kind == CLASSIFICATION:
            return out.logits
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def _batch_loss(self, model: nn.Module, batch: dict, reference) -> tuple[float, int]:
        if self.kind == CAUSAL_LM:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            tokens = int((labels[:, 1:] != -100).sum())
            return float(model(**_model_inputs(batch), labels=labels, use_cache=False).loss) * tokens, tokens
        output = self._output(model, batch)
        if self.kind == CLASSIFICATION:
            if "labels" in batch:
                return float(F.cross_entropy(output, batch["labels"], reduction="sum")), len(output)
            kl = F.kl_div(F.log_softmax(output, -1), F.log_softmax(reference, -1), log_target=True, reduction="sum")
            return float(kl), len(output)
        return float((1 - F.cosine_similarity(output, reference, dim=-1)).sum()), len(output)

    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch, reference in zip(self.batches, self.references):
                loss, n = self._batch_loss(model, batch, reference)
                total, count = total + loss, count + n
        mean = total / max(count, 1)
        # 1 - cos and KL are >= 0; round-off can leave -1e-8 for the dense model itself
        return mean if self.kind == CAUSAL_LM else max(mean, 0.0)
