"""Scores of a model on held-out data: STS-B Spearman, causal-LM perplexity, fidelity to the dense model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from .calibrate import mean_pool
from .data import read_dataset, tokenize_stream
from .errors import UserError

BATCH_SIZE = 32


def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states, (n, d), in the sentence-transformers convention."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), BATCH_SIZE):
            batch = tokenizer(sentences[i:i + BATCH_SIZE], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            out.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(out)


def stsb_spearman(model: nn.Module, tokenizer, path: str) -> float:
    """Spearman x 100 between cosine similarity of the pair's embeddings and the gold score."""
    data = read_dataset(path)
    if data.pairs is None or data.labels is None:
        raise UserError(f"{path} has no scored sentence pairs: give an STS-B file (e.g. sts-dev.csv)")
    first = sentence_embeddings(model, tokenizer, [a for a, _ in data.pairs])
    second = sentence_embeddings(model, tokenizer, [b for _, b in data.pairs])
    cosine = F.cosine_similarity(first, second, dim=-1)
    return float(spearmanr(cosine.numpy(), data.labels).statistic * 100)


def perplexity(model: nn.Module, tokenizer, path: str, seq_len: int = 512, max_tokens: int | None = None) -> float:
    """exp(mean next-token loss) over non-overlapping windows of the text (the first `max_tokens`)."""
    data = read_dataset(path, fmt="text")
    num_windows = 10**9 if max_tokens is None else max(1, max_tokens // seq_len)
    windows = tokenize_stream(tokenizer, data.texts, seq_len, num_windows, seed=0).input_ids
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), 4):
            batch = windows[i:i + 4]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            total, count = total + float(loss) * tokens, count + tokens
    return math.exp(total / count)


def fidelity(model: nn.Module, dense: nn.Module, tokenizer, texts: list[str]) -> float:
    """Mean cosine similarity of pooled outputs to the dense model's, on held-out text (1.0 = identical)."""
    return float(F.cosine_similarity(sentence_embeddings(model, tokenizer, texts),
                                     sentence_embeddings(dense, tokenizer, texts), dim=-1).mean())
