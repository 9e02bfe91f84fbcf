"""GGUF files run by llama.cpp itself (llama-cpp-python): timed as they are served, one sequence at a
time, on the deployed thread count, and scored on token ids.

Two timings, as llama.cpp serves a decoder: `prefill` evaluates a prompt from an empty cache, `decode`
one new token after a cached context (the cache is cut back to the context before each call, so every
call does the same work).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .errors import UserError
from .spec import LLAMA_CPP_MISSING

log = logging.getLogger(__name__)

MODES = ("prefill", "decode")
UNREPACKED_TYPES = ("q8_0",)  # weight types whose repacked buffers crash llama-cpp-python 0.3.36 here


def repacks(file_type: str) -> bool:
    """Whether llama.cpp may repack weights of `file_type` into its CPU buffers (`model_parameters`)."""
    return file_type not in UNREPACKED_TYPES


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(LLAMA_CPP_MISSING) from None
    if not _QUIET:
        _QUIET.append(llama_cpp.llama_log_callback(errors_only))  # kept referenced: llama.cpp calls it later
        llama_cpp.llama_log_set(_QUIET[0], ctypes.c_void_p(0))
    return llama_cpp


GGML_LOG_ERROR = 4  # ggml.h's ggml_log_level
_QUIET: list = []  # the log callback installed


def errors_only(level: int, text: bytes, user_data) -> None:
    """llama.cpp's log, errors only, into this package's log. The Python binding's own callback reads
    an older numbering of ggml's levels and prints warnings even with verbose=False (a pruned member's
    per-layer KV sizes warn on every load)."""
    if level == GGML_LOG_ERROR:
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def model_parameters(repacked: bool) -> Iterator[None]:
    """llama.cpp's model parameters with or without its repacked CPU weight buffers. Llama() does not take
    the switch; it reads the defaults, which are wrapped while it loads. llama-cpp-python 0.3.36 crashes
    (SIGSEGV) on q8_0 weights in those buffers on an AMX Xeon (docs/BENCHMARKS.md): they are left out there."""
    llama_cpp = llama_cpp_module()
    default = llama_cpp.llama_cpp.llama_model_default_params

    def parameters():
        params = default()
        params.use_extra_bufts = repacked
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = parameters
    try:
        yield
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = default


def load(path: Path, threads: int, context: int, repacked: bool = True, on_gpu: bool = False, **kwargs):
    """A llama.cpp model of the GGUF file at `path`, with room for `context` tokens; every layer on the
    GPU where `on_gpu`."""
    if not Path(path).is_file():
        raise UserError(f"GGUF file {path} does not exist: write it with `ziplm-planner export-gguf`")
    llama_cpp = llama_cpp_module()
    with model_parameters(repacked):
        return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                               n_threads_batch=threads, n_gpu_layers=-1 if on_gpu else 0, verbose=False, **kwargs)


def timed_call(path: Path, mode: str, tokens: list[int], threads: int, repacked: bool = True,
               on_gpu: bool = False) -> Callable[[], None]:
    """What one timing runs: `tokens` as a prompt (prefill), or the last one after the others, cached (decode)."""
    if mode not in MODES:
        raise UserError(f"llama.cpp timing mode must be one of {', '.join(MODES)}, got {mode!r}")
    llm = load(path, threads, len(tokens) + 1, repacked, on_gpu)
    if mode == "prefill":
        def run():
            llm.n_tokens = 0  # eval cuts the cache back to n_tokens: an empty cache
            llm.eval(tokens)
        return run
    llm.eval(tokens[:-1])

    def step():
        llm.n_tokens = len(tokens) - 1  # the context stays cached; the new token is decoded again each call
        llm.eval(tokens[-1:])
    return step


def perplexity(path: Path, windows: list[list[int]], threads: int, repacked: bool = True) -> float:
    """exp of the mean next-token loss over `windows` of token ids, each from an empty cache, with an f32
    cache (ggml type 0: the default f16 one rounds keys and values)."""
    length = max(map(len, windows))
    llm = load(path, threads, length, repacked, logits_all=True, type_k=0, type_v=0)
    total, count = 0.0, 0
    for window in windows:
        llm.n_tokens = 0
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(total / count)


def gguf_forward(path: Path, threads: int | None = None) -> Callable:
    """A causal LM's logits from its GGUF file, as evaluate scores a forward: (batch, sequence, vocab)
    float32 from a batch of token ids and attention mask, each row from an empty (f32) cache; padded
    positions are zeros. The model is loaded again, larger, when a batch is longer than any before."""
    import os

    import torch

    threads = threads or os.cpu_count()
    loaded: dict[str, object] = {"context": 0}

    def model_for(length: int):
        if length > loaded["context"]:
            loaded.update(context=length, llm=load(path, threads, length, logits_all=True, type_k=0, type_v=0))
        return loaded["llm"]

    def forward(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        llm = model_for(ids.shape[1])
        logits = torch.zeros(*ids.shape, llm.n_vocab(), dtype=torch.float32)
        for row in range(len(ids)):
            kept = ids[row][mask[row]].tolist()
            if kept:
                llm.n_tokens = 0
                llm.eval(kept)
                logits[row, mask[row]] = torch.from_numpy(np.asarray(llm.scores[: len(kept)], dtype=np.float32))
        return logits
    return forward
