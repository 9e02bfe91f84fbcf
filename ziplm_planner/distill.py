"""Distillation loss terms, stateless: tensors in, a scalar out (DESIGN.md, "Recovery").

    loss = w_task * task + w_kl * T^2 * KL(teacher || student) + w_sq * SquareHead

SquareHead (Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of LLMs"):
for every layer l, the mean over real tokens of (s_l - t_l)^2 normalised by the mean of t_l^2,
summed over layers; the normalisation makes every layer count alike whatever the scale of its
hidden states. Embedding models have no logits: the KL term becomes the cosine distance of
their mean-pooled embeddings. Padding never enters any term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .calibrate import mean_pool
from .models import CAUSAL_LM, CLASSIFICATION
from .settings import LossWeights


def squarehead(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ_l mean_tokens (s_l - t_l)^2 / mean_tokens t_l^2 over real tokens.

    student, teacher: one (batch, seq, hidden) tensor per layer output; mask: (batch, seq) of real tokens."""
    real = mask.bool()
    terms = [(s[real] - t[real]).pow(2).mean() / t[real].pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).sum()


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


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over real tokens: position i predicts token i + 1."""
    targets = input_ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def distillation_terms(kind: str, student_out, teacher_out, batch: dict[str, torch.Tensor],
                       weights: LossWeights) -> dict[str, torch.Tensor]:
    """Every weighted term and their sum ("loss"); outputs carry hidden_states (output_hidden_states=True),
    `weights` every weight (TrainSettings.for_kind fills in what a user leaves to the model)."""
    mask = batch["attention_mask"]
    # hidden_states[0] is the embedding output; SquareHead is on every layer's output. With weight 0 it
    # is only logged, and backward need not go through it
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.squarehead > 0):
        terms = {"squarehead": squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask)}
    if kind == CAUSAL_LM:
        terms["kl"] = kl_divergence(student_out.logits, teacher_out.logits, weights.temperature, mask)
        terms["task"] = causal_lm_loss(student_out.logits, batch["input_ids"], mask)
    elif kind == CLASSIFICATION:
        terms["kl"] = kl_divergence(student_out.logits, teacher_out.logits, weights.temperature)
        if "labels" in batch:
            terms["task"] = F.cross_entropy(student_out.logits.float(), batch["labels"])
    else:
        terms["kl"] = embedding_distance(student_out.last_hidden_state, teacher_out.last_hidden_state, mask)
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
