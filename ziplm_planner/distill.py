"""Distillation loss terms, stateless: tensors in, a scalar out (SquareHead, Kurtic et al. 2023; CAP,
Xu et al. 2022).

    loss = w_task * task + w_kl * T^2 * KL(teacher || student) + w_sq * SquareHead + w_c * contrastive

SquareHead (Kurtic et al. 2023, "Sparse fine-tuning for inference acceleration of LLMs"):
for every layer l, the mean over real tokens of (s_l - t_l)^2 normalised by the mean of t_l^2,
summed over layers; the normalisation makes every layer count alike whatever the scale of its
hidden states. The KL and task terms are the model kind's (`ModelKind.distillation`): embedding
models have no logits, and their KL term is the cosine distance of their mean-pooled embeddings.
Padding never enters any term.

The contrastive term is CAP's: each example's student representation (`ModelKind.representation`)
should be nearer its teachers' representations of the same example (and, with labels, of examples of
its class) than of the other examples of the batch and of a memory of recent batches: InfoNCE with
several positives (supervised contrastive form), on unit vectors, averaged over the teachers. The
memory is the one piece of state (`RepresentationMemory`); the term itself takes it as a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kinds import ModelKind
from .settings import LossWeights


def squarehead(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Σ_l mean_tokens (s_l - t_l)^2 / mean_tokens t_l^2 over real tokens.

    student, teacher: one (batch, seq, hidden) tensor per layer output; mask: (batch, seq) of real tokens."""
    real = mask.bool()
    terms = [(s[real] - t[real]).pow(2).mean() / t[real].pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).sum()


def info_nce(anchors: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over anchors i of mean over their positives p of -log softmax_k(z_i . k_k / t)[p].

    anchors: (n, d), keys: (k, d), both unit vectors; positive: (n, k) bool, at least one per row."""
    log_prob = (anchors @ keys.T / temperature).log_softmax(dim=1)
    return -(log_prob * positive).sum(1).div(positive.sum(1)).mean()


def contrastive(student: torch.Tensor, teachers: Sequence[torch.Tensor], memories: Sequence[torch.Tensor],
                temperature: float, labels: torch.Tensor | None = None,
                memory_labels: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """CAP's contrastive term, averaged over teachers: the student's representation of each example
    against one teacher's of the batch and of that teacher's memory. Positives: the teacher's
    representation of the same example, and where `labels` are given every key of the same label.

    student: (batch, d); teachers: one (batch, d) per teacher; memories: one (m, d) per teacher (m may be
    0); labels: (batch,), memory_labels: one (m,) per teacher."""
    anchors = F.normalize(student.float(), dim=-1)
    same_example = torch.eye(len(student), dtype=torch.bool, device=student.device)
    terms = []
    for index, (teacher, memory) in enumerate(zip(teachers, memories, strict=True)):
        keys = F.normalize(torch.cat([teacher.float(), memory.float()]), dim=-1)
        positive = torch.cat([same_example, same_example.new_zeros(len(student), len(memory))], dim=1)
        if labels is not None:
            key_labels = torch.cat([labels, memory_labels[index]])
            positive |= labels[:, None] == key_labels[None, :]
        terms.append(info_nce(anchors, keys, positive, temperature))
    return torch.stack(terms).mean()


@dataclass
class RepresentationMemory:
    """The last `size` representations (and labels) one teacher gave: the negatives of later batches."""

    size: int
    vectors: torch.Tensor | None = None  # (m, d), newest last
    labels: torch.Tensor | None = None  # (m,)

    def keys(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(vectors (m, d), labels (m,)): empty ones, shaped as `like` (batch, d), before the first push."""
        if self.vectors is None:
            return like.new_zeros(0, like.shape[-1]), torch.zeros(0, dtype=torch.long, device=like.device)
        return self.vectors, self.labels

    def push(self, vectors: torch.Tensor, labels: torch.Tensor | None) -> None:
        labels = torch.full((len(vectors),), -1, device=vectors.device) if labels is None else labels
        old_vectors, old_labels = self.keys(vectors)
        self.vectors = torch.cat([old_vectors, vectors.detach().float()])[-self.size:] if self.size else None
        self.labels = torch.cat([old_labels, labels.long()])[-self.size:] if self.size else None


def distillation_terms(kind: ModelKind, student_out, teacher_out, batch: dict[str, torch.Tensor],
                       weights: LossWeights, contrast=None) -> dict[str, torch.Tensor]:
    """Every weighted term and their sum ("loss"); outputs carry hidden_states (output_hidden_states=True),
    `weights` every weight (TrainSettings.for_kind fills in what a user leaves to the model). `contrast`
    (train.Contrast) gives the contrastive term where its weight is not 0."""
    mask = batch["attention_mask"]
    # hidden_states[0] is the embedding output; SquareHead is on every layer's output. With weight 0 it
    # is only logged, and backward need not go through it
    with torch.set_grad_enabled(torch.is_grad_enabled() and weights.squarehead > 0):
        terms = {"squarehead": squarehead(student_out.hidden_states[1:], teacher_out.hidden_states[1:], mask)}
    terms.update(kind.distillation(student_out, teacher_out, batch, weights.temperature))
    if weights.contrastive > 0:
        terms["contrastive"] = contrast.term(student_out, teacher_out, batch)
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
