"""Training text written by the dense model itself, for recovery where there is no text to train on.

Distillation asks the student to match the teacher; text sampled from the teacher is drawn from that
distribution, and LLM-QAT (Liu et al. 2023) distils on such text alone. Each sample continues the
first tokens of a window of a prompt file, so the text keeps that file's domain; without one,
samples start from the BOS token. Measured on SmolLM2 (BENCHMARKS), real in-domain text recovers far
more per token, and mixing samples into it at a fixed budget made members worse: this is the
fallback when there is none.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write_text, check_writable
from .data import TEXT_SUFFIXES
from .errors import UserError
from .kinds import ModelKind
from .models import LoadedModel
from .progress import bar, stage
from .recovery import load_training_data
from .settings import GenerationSettings
from .train import autocast_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class GeneratedText:
    samples: list[str]  # prompt and continuation, as text
    new_tokens: int  # tokens the model wrote, prompts not counted
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else float("nan")


def generate_text(loaded: LoadedModel, settings: GenerationSettings = GenerationSettings(),
                  prompts: str | Path | None = None) -> GeneratedText:
    """Sample about `settings.tokens` new tokens from `loaded`, in samples of `settings.seq_len` tokens
    (shorter where the model ends one), deterministic in `settings.seed` on a given machine."""
    check_writes_text(loaded.source.reference, loaded.kind)
    starts = prompt_ids(loaded, prompts, settings)  # (prompts, prompt length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = autocast_precision(settings.precision, gpu=device.type == "cuda")
    model, home = loaded.model.eval(), next(loaded.model.parameters()).device
    samples, written, started = [], 0, time.perf_counter()
    with (stage("generate text", f"{settings.tokens:,} tokens, {precision if precision != 'no' else 'float32'}"),
          bar(total=settings.tokens, desc="generating", unit="tok") as shown,
          torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])):
        torch.manual_seed(settings.seed)
        model.to(device)
        try:
            for first in itertools.count(0, settings.batch_size):  # prompts reused in turn if the file runs out
                # (batch, prompt length), on the model's device: each prompt is joined to its continuation there
                batch = starts[torch.arange(first, first + settings.batch_size) % len(starts)].to(device)
                for prompt, continuation in zip(batch, continue_prompts(model, batch, settings, precision)):
                    samples.append(loaded.tokenizer.decode(torch.cat([prompt, continuation]), skip_special_tokens=True))
                    written += len(continuation)
                shown.update(min(written, settings.tokens) - shown.n)
                if written >= settings.tokens:
                    break
        finally:
            model.to(home)  # the caller's model stays where it was
    return GeneratedText(samples, written, time.perf_counter() - started)


def check_writes_text(reference: str, kind: ModelKind) -> None:
    if not kind.generates:
        raise UserError(f"{reference} is not a causal language model ({kind.name}), so it writes no text: "
                        "give real text to --train-data")


def prompt_ids(loaded: LoadedModel, path: str | Path | None, settings: GenerationSettings) -> torch.Tensor:
    """(prompts, prompt length) token ids: the first `prompt_tokens` of every training window of `path`,
    in a seeded order, or a single BOS token."""
    if path is not None:
        windows = load_training_data(loaded, [str(path)], settings.seq_len, settings.seed,
                                     "--prompts file").input_ids  # (windows, seq_len)
        return windows[:, : settings.prompt_tokens]
    candidates = (loaded.tokenizer.bos_token_id, loaded.model.generation_config.bos_token_id, loaded.tokenizer.eos_token_id)
    start = next((token for token in candidates if token is not None), None)
    if start is None:
        raise UserError("neither the tokenizer nor the model names a BOS or EOS token to start samples from: "
                        "give --prompts FILE")
    return torch.tensor([[start]])


def continue_prompts(model, prompts: torch.Tensor, settings: GenerationSettings, precision: str) -> list[torch.Tensor]:
    """Each prompt's sampled continuation up to the sample length, cut after the model's end token."""
    from transformers import GenerationConfig

    ends = end_tokens(model)
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                              max_new_tokens=settings.seq_len - prompts.shape[1], eos_token_id=sorted(ends) or None,
                              pad_token_id=min(ends) if ends else 0)
    with torch.no_grad(), torch.autocast(prompts.device.type, dtype=AUTOCAST_DTYPES.get(precision),
                                         enabled=precision in AUTOCAST_DTYPES):
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    return [cut_after_end(row, ends) for row in out[:, prompts.shape[1]:].cpu()]


def end_tokens(model) -> set[int]:
    ids = model.generation_config.eos_token_id
    return set() if ids is None else {ids} if isinstance(ids, int) else set(ids)


def cut_after_end(ids: torch.Tensor, ends: set[int]) -> torch.Tensor:
    """`ids` up to and including its first end token; generate pads the rest of a finished sample."""
    ended = torch.isin(ids, torch.tensor(sorted(ends), dtype=ids.dtype)).nonzero()
    return ids[: int(ended[0]) + 1] if len(ended) else ids


def write_samples(path: Path, generated: GeneratedText) -> Path:
    """A text file `--train-data` reads: samples separated by blank lines."""
    return atomic_write_text(path, "\n\n".join(s.strip() for s in generated.samples) + "\n")


def check_output(path: Path) -> Path:
    """Fail before minutes of sampling when the output cannot be written or would not read back as text."""
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise UserError(f"{path}: name the output .txt or .raw, so that --train-data reads it as plain text")
    return check_writable(path)
