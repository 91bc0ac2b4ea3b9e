"""What fxtp is doing while a user waits: each long stage's time, logged under the "fxtp" logger.

Compiling a big model takes minutes (export, planning, loading each rank's slices, inductor, CUDA-graph
capture), and a silent wait looks like a hang. Each stage logs one INFO line with its time when it
ends (DEBUG: also when it starts), on rank 0 of a process group (or of a torchrun job, by RANK); the
other ranks log warnings only. On a terminal, a tqdm line names the stage under way and its time so
far, as HF's loader shows its progress, and is cleared when the log line replaces it.
FXTP_VERBOSITY=error|warning|info|debug sets the level (default info). fxtp installs its handler
only when the logger has none, so `logging.getLogger("fxtp")` configured by the user wins; like
transformers' logger it does not propagate to the root logger, which would print each line twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import torch.distributed as dist
from tqdm import tqdm

LOGGER = logging.getLogger("fxtp")
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def configure_logger() -> logging.Logger:
    """The "fxtp" logger, given fxtp's handler and level from FXTP_VERBOSITY the first time."""
    # pytest (>= 9.2) attaches its log capture to every logger that does not propagate: not the user's
    if any(type(handler).__module__ != "_pytest.logging" for handler in LOGGER.handlers):
        return LOGGER
    verbosity = os.environ.get("FXTP_VERBOSITY", "info").lower()
    if verbosity not in LEVELS:
        raise ValueError(f"FXTP_VERBOSITY={verbosity!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
    handler.fxtp_own = True  # its stream shows stages under way (`running_clock`)
    handler.setFormatter(logging.Formatter("fxtp: %(message)s"))
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or this_rank() == 0)
    LOGGER.addHandler(handler)
    LOGGER.setLevel(LEVELS[verbosity])
    LOGGER.propagate = False
    return LOGGER


def this_rank() -> int:
    """This process's rank: in its process group once there is one (processes fxtp spawns have no
    RANK variable), else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def stage(what: str):
    """Log `what` with the time it took (INFO), and its start (DEBUG); nothing if it raises. Meanwhile
    a terminal shows it with its time so far."""
    logger = configure_logger()
    logger.debug("%s ...", what)
    start = time.perf_counter()
    with running_clock(what, logger):
        yield
    logger.info("%s: %.1f s", what, time.perf_counter() - start)


@contextlib.contextmanager
def running_clock(what: str, logger: logging.Logger, tick_s: float = 0.5):
    """A tqdm line "fxtp: <what> [elapsed]" on the stream of fxtp's own handler, ticking every
    `tick_s` while the block runs and cleared after it: where that stream is a terminal and the logger
    shows INFO on this rank. Elsewhere (files, CI logs, a logger the user configured) nothing."""
    stream = next((h.stream for h in logger.handlers if getattr(h, "fxtp_own", False)), None)
    shown = (stream is not None and getattr(stream, "isatty", lambda: False)() and logger.isEnabledFor(logging.INFO)
             and this_rank() == 0)
    if not shown:
        yield
        return
    bar = tqdm(total=None, desc=f"fxtp: {what}", bar_format="{desc} [{elapsed}]", file=stream, leave=False)
    done = threading.Event()

    def tick():
        while not done.wait(tick_s):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="fxtp-stage-clock", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()
