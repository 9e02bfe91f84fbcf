"""What a run shows while it works: a line per stage on stderr, and progress bars on a terminal only.

Stages log to the `ziplm_planner.stage` logger at INFO, when they start and when they end:

    [ziplm] level database: 6 layers, 512 samples ...
    [ziplm] level database done in 14.7 s

Nothing shows them until `show_stages()` is called (the CLI calls it at every verbosity), so a
library user or a test sees them only when asking: `show_stages()`, or pytest's
`caplog.at_level(logging.INFO, logger=STAGE_LOGGER)`.

Bars are drawn only when stderr is a terminal: in a redirected log, their carriage returns and
escape codes are noise. ZIPLM_PROGRESS=1 draws them anyway, ZIPLM_PROGRESS=0 never.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm

STAGE_LOGGER = "ziplm_planner.stage"
PREFIX = "[ziplm] "

log = logging.getLogger(STAGE_LOGGER)
_depth: ContextVar[int] = ContextVar("ziplm_stage_depth", default=0)


# --- stages -------------------------------------------------------------------------------------


class Stage:
    """A running stage. An `outcome` set inside the block is added to its closing line."""

    def __init__(self, name: str):
        self.name = name
        self.outcome = ""


def duration(seconds: float) -> str:
    """'14.7 s' up to a minute and a half, then '2 min 5 s'."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[Stage]:
    """Log `name: detail ...` now and `name done in ...` when the block ends. Nothing is logged when
    the block raises: the error that follows says what went wrong. Nested stages are indented."""
    indent = "  " * _depth.get()
    log.info("%s%s%s ...", indent, name, f": {detail}" if detail else "")
    current, started, token = Stage(name), time.perf_counter(), _depth.set(_depth.get() + 1)
    try:
        yield current
    finally:
        _depth.reset(token)
    outcome = f" ({current.outcome})" if current.outcome else ""
    log.info("%s%s done in %s%s", indent, name, duration(time.perf_counter() - started), outcome)


def note(line: str) -> None:
    """A line inside the running stage, indented under it: how far a long stage has come, for a log
    that has no bar (a redirected run that trains for hours would otherwise say nothing until done)."""
    log.info("%s%s", "  " * _depth.get(), line)


class _StageHandler(logging.Handler):
    """Writes each line with tqdm.write, which lifts any bar on the screen above it, to sys.stderr
    as it is at that moment (click's test runner and pytest replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # here, not at the top: it loads asyncio, and --help should not wait

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def show_stages() -> Callable[[], None]:
    """Print stage lines on stderr from now on; returns the function that stops it."""
    handler = _StageHandler()
    handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # once, also when the root logger shows INFO (-v)

    def stop() -> None:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    return stop


# --- bars ---------------------------------------------------------------------------------------


def bars_enabled() -> bool:
    """ZIPLM_PROGRESS=0 or 1 if set, else whether stderr is a terminal."""
    forced = os.environ.get("ZIPLM_PROGRESS", "").strip()
    if forced:
        return forced != "0"
    return sys.stderr is not None and sys.stderr.isatty()


def bar(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """tqdm, drawn only where `bars_enabled()`; `disable=True` keeps it off anyway."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable or not bars_enabled(), **kwargs)


@contextmanager
def transformers_bars() -> Iterator[None]:
    """transformers' own bars follow the same rule as ours while the block runs: those drawn through its
    logging ("Loading weights"), and the GGUF dequantisation bar, a bare tqdm that no transformers setting
    reaches (tqdm's TQDM_DISABLE is read once, at its import), so swapped for the block's duration."""
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as transformers_logging

    was_enabled, gguf_tqdm = transformers_logging.is_progress_bar_enabled(), gguf.tqdm
    if not bars_enabled():
        transformers_logging.disable_progress_bar()
        gguf.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = gguf_tqdm
        if was_enabled:
            transformers_logging.enable_progress_bar()
