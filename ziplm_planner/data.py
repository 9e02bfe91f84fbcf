"""Calibration and evaluation data: read files by path, turn text into fixed-shape token batches.

Formats (auto-detected from the first non-empty line, or forced with `fmt`):
  text  one sample per non-empty line; WikiText ` = Heading = ` lines are skipped.
  stsb  STS-B TSV, no header: genre, file, year, id, score (0-5), sentence1, sentence2[, extra...].
  glue  GLUE TSV with a header naming `sentence` or `sentence1` (and optionally `label`).
TSV files are split on tabs only, never with CSV quoting: the sentences contain quotes.
.txt and .raw files are always text; a file that looks like a table (a .tsv or .csv name, or
tabs on most lines) must be STS-B or GLUE, else reading it is an error naming the line.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ziplm_planner.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading and checking files stays light
    import torch

log = logging.getLogger(__name__)

FORMATS = ("text", "stsb", "glue")
TEXT_SUFFIXES = {".txt", ".raw"}
_TABLE_SUFFIXES = {".tsv", ".csv"}
_FILE_SUFFIXES = TEXT_SUFFIXES | _TABLE_SUFFIXES | {".json", ".jsonl", ".parquet"}
STSB_FIELDS = 7  # genre, file, year, id, score, sentence1, sentence2
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# GLUE column pairs, most specific first (MRPC/RTE/STS-B, then QNLI).
_GLUE_PAIRS = (("sentence1", "sentence2"), ("question", "sentence"))


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]  # single sentences, or the first sentence of each pair
    pairs: list[tuple[str, str]] | None  # STS-B / GLUE pair tasks
    labels: list[float] | list[int] | None  # STS-B scores (float) or GLUE class labels (int)
    fmt: str  # "text" | "stsb" | "glue"
    source: str  # path or Hugging Face dataset name


def read_dataset(path: str | os.PathLike, fmt: str | None = None, what: str = "data file") -> TextDataset:
    """Read a data file, detecting its format unless `fmt` is given; `what` names it in errors (the option
    it came from)."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)} or leave it out")
    check_exists(path, what)
    p = Path(path)
    if not p.exists():
        return _load_hf(str(path), what)
    try:
        content = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    lines = [line.rstrip("\r") for line in content.split("\n")]  # not splitlines: \x0b etc. are text
    fmt = fmt or _detect(p, lines)
    parse = {"text": _parse_text, "stsb": _parse_stsb, "glue": _parse_glue}[fmt]
    ds = parse(p, lines)
    if not ds.texts:
        raise UserError(f"{p} contains no samples (empty, or only blank/heading lines)")
    log.info("read %d samples (%s) from %s", len(ds.texts), fmt, p)
    return ds


def draw(population: int, count: int, seed: int, held_out: int = 0) -> list[int]:
    """`count` of range(population) at random without replacement (deterministic in `seed`; all if
    fewer), then up to `held_out` more from those left: samples the first `count` never showed."""
    chosen = random.Random(seed).sample(range(population), min(count, population))
    rest = sorted(set(range(population)).difference(chosen))
    return chosen + random.Random(seed + 1).sample(rest, min(held_out, len(rest)))


def sentences(dataset: TextDataset) -> list[str]:
    """Every sentence: the texts, or both sentences of each pair."""
    return dataset.texts if dataset.pairs is None else [s for pair in dataset.pairs for s in pair]


def sample_rows(dataset: TextDataset, num_samples: int | None, seed: int, held_out: int = 0) -> list[int]:
    """Which of `sentences(dataset)` make the samples: all, in order, for None; else `num_samples` drawn
    without replacement (all if fewer), then up to `held_out` more that are not among them."""
    count = len(sentences(dataset))
    if num_samples is None:
        return list(range(count))
    if num_samples < 1:
        raise UserError(f"number of calibration samples must be >= 1, got {num_samples}")
    return draw(count, num_samples, seed, held_out)


def _detect(path: Path, lines: list[str]) -> str:
    """text, glue or stsb. A file that looks like a table must be one of the two table formats: read
    as plain text, a table with the wrong columns would silently calibrate on its column soup."""
    first = next(((n, line) for n, line in enumerate(lines, 1) if line.strip()), None)
    if path.suffix.lower() in TEXT_SUFFIXES or first is None:
        return "text"
    n, line = first
    fields = [f.strip() for f in line.split("\t")]
    if "sentence" in fields or "sentence1" in fields:
        return "glue"
    if not _looks_tabular(path, lines):
        return "text"
    if len(fields) >= STSB_FIELDS:
        return "stsb"  # _parse_stsb names the first line that is not STS-B
    raise UserError(f"{path} line {n}: looks like a TSV but is neither STS-B (>= {STSB_FIELDS} tab-separated fields, "
                    f"a 0-5 score in the 5th) nor GLUE (a header naming 'sentence' or 'sentence1'): got "
                    f"{len(fields)} field(s); fix the columns, or give plain text in a .txt file")


def _looks_tabular(path: Path, lines: list[str]) -> bool:
    """A .tsv/.csv name, or tabs on most non-empty lines."""
    if path.suffix.lower() in _TABLE_SUFFIXES:
        return True
    filled = [line for line in lines if line.strip()]
    return sum("\t" in line for line in filled) > len(filled) / 2


def _score(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if 0.0 <= x <= 5.0 else None


def _text_samples(lines: Sequence[str]) -> list[str]:
    """Non-empty lines, minus WikiText headings such as ` = Title = ` or ` = = Section = = `."""
    stripped = (line.strip() for line in lines)
    return [s for s in stripped if s and not (s.startswith("= ") and s.endswith(" ="))]


def _parse_text(path: Path, lines: list[str]) -> TextDataset:
    return TextDataset(_text_samples(lines), None, None, "text", str(path))


def _parse_stsb(path: Path, lines: list[str]) -> TextDataset:
    pairs, scores = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < STSB_FIELDS:
            raise UserError(f"{path} line {n}: expected >= {STSB_FIELDS} tab-separated fields, got {len(fields)} "
                            "(STS-B: genre, file, year, id, score, sentence1, sentence2)")
        score = _score(fields[4])
        if score is None:
            raise UserError(f"{path} line {n}: score {fields[4]!r} is not a number in [0, 5] (STS-B)")
        pairs.append((fields[5].strip(), fields[6].strip()))
        scores.append(score)
    return TextDataset([a for a, _ in pairs], pairs, scores, "stsb", str(path))


def _parse_glue(path: Path, lines: list[str]) -> TextDataset:
    header = [c.strip() for c in lines[0].split("\t")]
    pair = next(((a, b) for a, b in _GLUE_PAIRS if a in header and b in header), None)
    cols = pair or next(((c,) for c in ("sentence", "sentence1") if c in header), None)
    if cols is None:
        raise UserError(f"{path} line 1: GLUE header has no 'sentence' or 'sentence1' column (got {header})")
    idx = [header.index(c) for c in cols]
    label_idx = header.index("label") if "label" in header else None
    need = max(idx + [label_idx or 0]) + 1
    rows, labels = [], []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < need:
            raise UserError(f"{path} line {n}: expected >= {need} tab-separated fields, got {len(fields)}")
        rows.append(tuple(fields[i].strip() for i in idx))
        if label_idx is not None:
            labels.append(_label(fields[label_idx].strip(), path, n))
    pairs = rows if pair else None
    return TextDataset([r[0] for r in rows], pairs, labels if label_idx is not None else None, "glue", str(path))


def _label(value: str, path: Path, n: int) -> int | float:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    raise UserError(f"{path} line {n}: label {value!r} is not numeric; map class names to numbers first")


def check_exists(path: str | os.PathLike, what: str = "data file") -> None:
    """Refuse a path that is neither a file nor a Hugging Face dataset name (`name` or `name/config`):
    cheap, so commands check their data options before a model loads; `what` names the path in errors."""
    p, name = Path(path), str(path)
    if p.is_dir():
        raise UserError(f"{what} {name} is a directory; pass a data file (text lines, STS-B or GLUE TSV)")
    looks_hf = _HF_NAME.fullmatch(name) and p.suffix.lower() not in _FILE_SUFFIXES
    if not p.exists() and not looks_hf:
        raise UserError(f"{what} {name} does not exist; check the path")


def _load_hf(name: str, what: str) -> TextDataset:
    """A name (checked by check_exists) tried as a Hugging Face dataset."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise UserError(
            f"{what} {name} does not exist; Hugging Face dataset names need the "
            "`datasets` package (pip install datasets) and network access"
        ) from None
    try:
        ds = datasets.load_dataset(*name.split("/", 1), split="train")
    except Exception as e:  # network, unknown name, bad config: all user-fixable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load Hugging Face dataset {name}: {reason}") from None
    column = next((c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    if column is None:
        raise UserError(f"Hugging Face dataset {name} has no text column; pass a file instead")
    texts = _text_samples(ds[column])
    if not texts:
        raise UserError(f"Hugging Face dataset {name} column {column!r} contains no text")
    log.info("read %d samples from Hugging Face dataset %s (column %s)", len(texts), name, column)
    return TextDataset(texts, None, None, "text", name)


@dataclass(frozen=True)
class TokenBatches:
    input_ids: torch.Tensor  # (num_samples, seq_len) long
    attention_mask: torch.Tensor  # (num_samples, seq_len) long, 0 on padding
    labels: torch.Tensor | None  # (num_samples,) for labelled data, else None

    def batches(self, batch_size: int, trim: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive slices of `batch_size` samples (the last may be shorter).

        trim: drop the padding columns no sample of the batch reaches; with right padding and an
        attention mask, outputs at real tokens are unchanged and short sentences cost less."""
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        for i in range(0, len(self.input_ids), batch_size):
            mask = self.attention_mask[i : i + batch_size]
            length = int(mask.sum(dim=1).max()) if trim else mask.shape[1]
            batch = {"input_ids": self.input_ids[i : i + batch_size, :length], "attention_mask": mask[:, :length]}
            if self.labels is not None:
                batch["labels"] = self.labels[i : i + batch_size]
            yield batch

    @classmethod
    def joined(cls, parts: list[TokenBatches]) -> TokenBatches:
        """The samples of every part, in order (each padded to the same length); labels where all have them."""
        import torch

        labels = None if any(part.labels is None for part in parts) else torch.cat([part.labels for part in parts])
        return cls(torch.cat([part.input_ids for part in parts]), torch.cat([part.attention_mask for part in parts]),
                   labels)

    def split(self, first: int) -> tuple[TokenBatches, TokenBatches | None]:
        """The first `first` samples, and the rest (None if there are none)."""
        parts = [TokenBatches(self.input_ids[rows], self.attention_mask[rows],
                              None if self.labels is None else self.labels[rows])
                 for rows in (slice(None, first), slice(first, None))]
        return parts[0], parts[1] if len(parts[1].input_ids) else None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return int(self.attention_mask.sum())


def _check(texts: Sequence[str], seq_len: int) -> None:
    if not texts:
        raise UserError("no texts to tokenize; check the data file")
    if seq_len < 1:
        raise UserError(f"sequence length must be >= 1, got {seq_len}")


@contextmanager
def right_padding(tokenizer):
    """Pad on the right, with eos as pad if the tokenizer has none (Llama, GPT-2); restored on exit."""
    saved = tokenizer.pad_token, tokenizer.padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    try:
        yield tokenizer
    finally:
        tokenizer.pad_token, tokenizer.padding_side = saved


def tokenize_sentences(tokenizer, texts: Sequence[str], seq_len: int, labels=None) -> TokenBatches:
    """Encoder inputs: each text padded or truncated to `seq_len` (special tokens included)."""
    _check(texts, seq_len)
    if labels is not None and len(labels) != len(texts):
        raise UserError(f"got {len(labels)} labels for {len(texts)} texts")
    with right_padding(tokenizer):
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    import torch

    y = None
    if labels is not None:  # integer class labels stay long, scores become float
        is_int = all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
        y = torch.tensor(labels, dtype=torch.long if is_int else torch.float32)
    return TokenBatches(enc["input_ids"].long(), enc["attention_mask"].long(), y)


def tokenize_stream(tokenizer, texts: Sequence[str], seq_len: int, num_samples: int | None, seed: int,
                    held_out: int = 0) -> TokenBatches:
    """Causal-LM inputs: texts joined by blank lines, cut into non-overlapping `seq_len` windows,
    `num_samples` of them chosen at random (deterministic in `seed`), or all of them for None, then
    up to `held_out` windows more that are not among them; no special tokens added."""
    _check(texts, seq_len)
    if num_samples is not None and num_samples < 1:
        raise UserError(f"number of samples must be >= 1, got {num_samples}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise UserError(
            f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or a shorter sequence length"
        )
    if num_samples is None:
        num_samples = n_windows
    import torch

    windows = torch.tensor(ids[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)
    input_ids = windows[draw(n_windows, num_samples, seed, held_out)]  # (samples, seq_len)
    return TokenBatches(input_ids, torch.ones_like(input_ids), None)
