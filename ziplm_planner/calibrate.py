"""Calibration data and the calibration loss: the model's own, as its kind says (kinds.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ModelShape
from .data import TokenBatches, read_dataset
from .errors import UserError
from .kinds import ModelKind
from .models import LoadedModel

log = logging.getLogger(__name__)

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
    """Tokenise calibration data at the table's sequence length, as the model's kind does:
    `num_samples` samples, and up to `held_out` others of the same data, for scores that the
    Hessians' samples would flatter."""
    tokens = loaded.kind.tokenize(loaded.tokenizer, read_dataset(path, what="--calib file"), seq_len, num_samples,
                                  seed, held_out)
    samples, unseen = tokens.split(num_samples)
    check_enough_tokens(samples, path, num_samples, min_calibration_tokens(loaded.shape))
    if len(samples.input_ids) < num_samples:  # said once the data is known to be enough: not before a refusal
        log.warning("calibration data %s gives %d samples, fewer than the %d asked for; using all", path,
                    len(samples.input_ids), num_samples)
    return Calibration(samples, str(path), seq_len, unseen)


def min_calibration_tokens(shape: ModelShape) -> int:
    """Real tokens the Hessians need: one per input of the widest output projection (the attention's,
    heads x head_dim, or the FFN's, its neurons). With fewer, H = 2 XᵀX / N is singular and OBS would
    choose what to remove by the dampening, not by the data."""
    return max(shape.num_heads * shape.head_dim, shape.intermediate_size)


def check_enough_tokens(samples: TokenBatches, path: str, num_samples: int, needed: int) -> None:
    """Refuse calibration data too short for the Hessians, before any of them is computed."""
    found = samples.num_tokens
    if found >= needed:
        return
    given = len(samples.input_ids)
    remedy = "raise --num-samples or give longer samples" if given == num_samples else "give more text"
    raise UserError(f"calibration data {path} gives {given} sample(s) of the {num_samples} asked for, {found:,} real "
                    f"tokens in all: the Hessians need at least {needed:,} (one per input of the widest layer); "
                    f"{remedy}")


class CalibrationLoss:
    """Scores a (pruned) model by its calibration loss; lower is better. The dense model's
    references are computed once."""

    def __init__(self, dense: nn.Module, kind: ModelKind, batches: list[dict[str, torch.Tensor]]):
        self.kind, self.batches = kind, batches
        with torch.inference_mode():
            self.references = [kind.calibration_reference(dense, batch) for batch in batches]

    def __call__(self, model: nn.Module) -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch, reference in zip(self.batches, self.references):
                loss, n = self.kind.calibration_loss(model, batch, reference)
                total, count = total + loss, count + n
        # every kind's loss is >= 0; round-off can leave 1 - cos or KL at -1e-8 for the dense model itself
        return max(total / max(count, 1), 0.0)
