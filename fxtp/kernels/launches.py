"""Counts of fxtp's Triton kernel launches, by kernel and form, inside `counting_launches()`.

Every op of fxtp/kernels/ with a fallback (F.linear, the unfused ops, grouped_query_attention, NCCL)
computes the same values either way, so a test that compares the op with its reference passes even
where the kernel never ran. Such a test counts launches to know that the kernel itself computed the
values it checks. A launch is counted where the kernel is launched from Python: eagerly, or once when
a CUDA graph captures it (its replays run no Python). Nothing is counted outside `counting_launches`.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Iterator

_COUNTERS: list[collections.Counter] = []


def count_launch(kernel: str) -> None:
    """Called by a kernel's launcher right before it launches `kernel` (a name of it and its form)."""
    for counter in _COUNTERS:
        counter[kernel] += 1


@contextlib.contextmanager
def counting_launches() -> Iterator[collections.Counter]:
    """A Counter of the kernel launches made inside, by the names `count_launch` gets."""
    counter = collections.Counter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)
