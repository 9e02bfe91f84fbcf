"""Distillation loss terms, stateless: tensors in, a scalar out (SquareHead, Kurtic et al. 2023).

    loss = w_task * task + w_kl * T^2 * KL(teacher || student) + w_sq * SquareHead

SquareHead (Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of LLMs"):
for every layer l, the mean over real tokens of (s_l - t_l)^2 normalised by the mean of t_l^2,
summed over layers; the normalisation makes every layer count alike whatever the scale of its
hidden states. The KL and task terms are the model kind's (`ModelKind.distillation`): embedding
models have no logits, and their KL term is the cosine distance of their mean-pooled embeddings.
Padding never enters any term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kinds import ModelKind
from .settings import LossWeights


def squarehead(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ_l mean_tokens (s_l - t_l)^2 / mean_tokens t_l^2 over real tokens.

    student, teacher: one (batch, seq, hidden) tensor per layer output; mask: (batch, seq) of real tokens."""
    real = mask.bool()
    terms = [(s[real] - t[real]).pow(2).mean() / t[real].pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).sum()


def distillation_terms(kind: ModelKind, student_out, teacher_out, batch: dict[str, torch.Tensor],
                       weights: LossWeights) -> dict[str, torch.Tensor]:
    """Every weighted term and their sum ("loss"); outputs carry hidden_states (output_hidden_states=True),
    `weights` every weight (TrainSettings.for_kind fills in what a user leaves to the model)."""
    mask = batch["attention_mask"]
    # hidden_states[0] is the embedding output; SquareHead is on every layer's output. With weight 0 it
    # is only logged, and backward need not go through it
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.squarehead > 0):
        terms = {"squarehead": squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask)}
    terms.update(kind.distillation(student_out, teacher_out, batch, weights.temperature))
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
