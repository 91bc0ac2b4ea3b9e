"""What fxtp is doing while a user waits: each long stage's time, logged under the "fxtp" logger.

Compiling a big model takes minutes (export, planning, loading each rank's slices, inductor, CUDA-graph
capture), and a silent wait looks like a hang. Each stage logs one INFO line with its time when it
ends (DEBUG: also when it starts), on rank 0 of a process group (or of a torchrun job, by RANK); the
other ranks log warnings only.
FXTP_VERBOSITY=error|warning|info|debug sets the level (default info). fxtp installs its handler
only when the logger has none, so `logging.getLogger("fxtp")` configured by the user wins; like
transformers' logger it does not propagate to the root logger, which would print each line twice.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time

import torch.distributed as dist

LOGGER = logging.getLogger("fxtp")
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def configure_logger() -> logging.Logger:
    """The "fxtp" logger, given fxtp's handler and level from FXTP_VERBOSITY the first time."""
    if LOGGER.handlers:
        return LOGGER
    verbosity = os.environ.get("FXTP_VERBOSITY", "info").lower()
    if verbosity not in LEVELS:
        raise ValueError(f"FXTP_VERBOSITY={verbosity!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
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
    """Log `what` with the time it took (INFO), and its start (DEBUG); nothing if it raises."""
    logger = configure_logger()
    logger.debug("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s: %.1f s", what, time.perf_counter() - start)
