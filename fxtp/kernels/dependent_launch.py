"""Programmatic dependent launch (PDL) for fxtp's own Triton kernels (push all_reduce, decode
attention, GEMV) in a decode step compiled with PDL (`DecodeOptions.pdl`, fxtp/decode/options.py).

With PDL (Hopper and later) a kernel is scheduled once the kernel before it in the stream has
released its dependents (`gdc_launch_dependents`), not when it has finished, and waits for that
kernel to finish (`gdc_wait`) before it reads anything. Inductor's own kernels release after their
loads. fxtp's kernels release right after their wait, so the kernel after one of them can start
its own work that depends on nothing (fxtp's GEMV loads its first weights, and can prefetch more
into L2) while a latency-bound kernel (an all_reduce waiting on NVLink, attention over a short
cache) still runs. Releasing only after the wait keeps inductor's invariant: when a kernel is
scheduled, every kernel two or more before it has finished, so a kernel with no wait (inductor
leaves it out where a kernel reads nothing its predecessor wrote) reads finished data.

Only inside `launching_with_pdl(True)`, which DecodeGraph holds while it runs and captures a step
compiled with PDL: the ops' Python runs then, and the launches it makes are what the CUDA graph
replays.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

MIN_CAPABILITY = (9, 0)
_ON = contextvars.ContextVar("fxtp_pdl", default=False)
_PRELOAD = contextvars.ContextVar("fxtp_pdl_preload", default=True)


@contextlib.contextmanager
def launching_with_pdl(on: bool, preload: bool = True):
    """fxtp's kernels launched inside (on GPUs that have it) use PDL if `on`; fxtp's GEMV then loads
    its first weights before its wait if `preload`, else after it."""
    tokens = _ON.set(on), _PRELOAD.set(preload)
    try:
        yield
    finally:
        _ON.reset(tokens[0])
        _PRELOAD.reset(tokens[1])


def uses_pdl(device: torch.device) -> bool:
    """Whether a kernel launched now on `device` launches with PDL (and so waits and releases)."""
    return _ON.get() and device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def preloads() -> bool:
    """Whether a GEMV launched now with PDL loads its first weights before its wait."""
    return _PRELOAD.get()
