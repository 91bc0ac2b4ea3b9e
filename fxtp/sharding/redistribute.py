"""The steps that turn one layout into another, shared by propagation, codegen and dump.

    P -> R   all_reduce            R -> S   local slice (free)
    S -> R   all_gather            P -> S   all_reduce, then slice
    S -> S'  all_gather, then slice (two shards that own different elements)
"""
from __future__ import annotations

from fxtp.sharding.layouts import Layout, Partial, Replicate, Shard, same_placement


def same_layout(a: Layout, b: Layout) -> bool:
    if isinstance(a, Shard) and isinstance(b, Shard):
        return same_placement(a, b)
    return a == b


def steps(have: Layout, want: Layout) -> list[tuple[str, Layout]]:
    """[(step, layout after it)], empty when nothing needs to move."""
    if same_layout(have, want):
        return []
    if isinstance(want, Partial):
        raise ValueError(f"cannot make a Partial from {have}")
    out: list[tuple[str, Layout]] = []
    if isinstance(have, Partial):
        out.append(("all_reduce", Replicate()))
    elif isinstance(have, Shard):
        out.append(("all_gather", Replicate()))
    if isinstance(want, Shard):
        out.append(("slice", want))
    return out


def needs_gather(have: Layout, want: Layout) -> bool:
    return any(step == "all_gather" for step, _ in steps(have, want))
