"""Tensor layouts across ranks: Replicate, Shard (uneven, structured), Partial, OnRank.

A `Shard` splits one dimension that is structured as ``outer x n x inner``: the n axis holds
units (a head, or one element of an MLP intermediate), ``counts[r]`` of them belong to rank r,
and rank r owns its contiguous part of the n axis for every outer index. Fused projections
(GPT-2 c_attn: outer=3 blocks of q|k|v) and per-head interleaving (Bloom: inner=3*head_dim) are
both this one shape, so no layout needs to know what a "head" is.

`outer` (or `inner`) may be a sympy expression of the batch or sequence size: Bloom's and
XGLM's attention reshape [batch, heads, s, d] to [batch*heads, s, d], whose head shard is
``Shard(0, counts, outer=batch)``. Such a shard is never a stored tensor (state has static
shapes); rank graphs slice it by its structure (fxtp.sharding.collectives.local_part).

`OnRank(r)` is one element of a sharded dim selected away (head i of a loop over heads): it lies in
the part one rank owns, so rank r computes it and every value made from it, and the other ranks
skip those nodes. A join of such values in unit order (the loop's cat) is a Shard again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import sympy

__all__ = ["Replicate", "Shard", "Partial", "OnRank", "Layout", "balanced_counts", "same_placement", "held_by",
           "on_one_rank"]


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a summand; the true value is the sum over ranks."""

    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    dim: int
    counts: tuple[int, ...]
    inner: Union[int, sympy.Expr] = 1
    outer: Union[int, sympy.Expr] = 1

    @property
    def world_size(self) -> int:
        return len(self.counts)

    @property
    def units(self) -> int:
        return sum(self.counts)

    @property
    def global_size(self) -> int:
        return self.outer * self.units * self.inner

    def local_size(self, rank: int) -> int:
        return self.outer * self.counts[rank] * self.inner

    @property
    def symbolic(self) -> bool:
        """Whether `outer` or `inner` depends on batch or sequence (see the module docstring)."""
        return not (isinstance(self.inner, int) and isinstance(self.outer, int))

    def unit_start(self, rank: int) -> int:
        return sum(self.counts[:rank])

    def owned_ranges(self, rank: int) -> tuple[tuple[int, int], ...]:
        """Half-open element ranges of the global dim that `rank` owns, adjacent ones merged."""
        block = self.units * self.inner
        lo = self.unit_start(rank) * self.inner
        hi = lo + self.counts[rank] * self.inner
        ranges: list[tuple[int, int]] = []
        for o in range(self.outer):
            start, end = o * block + lo, o * block + hi
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            elif end > start:
                ranges.append((start, end))
        return tuple(ranges)

    def owner(self, index: int) -> tuple[int, int]:
        """(the rank that owns element `index` of the global dim, its position in that rank's part)."""
        block = self.units * self.inner
        outer, unit, within = index // block, index % block // self.inner, index % self.inner
        rank = next(r for r in range(self.world_size) if self.unit_start(r) + self.counts[r] > unit)
        return rank, (outer * self.counts[rank] + unit - self.unit_start(rank)) * self.inner + within

    def with_dim(self, dim: int) -> "Shard":
        return Shard(dim, self.counts, self.inner, self.outer)

    def __str__(self) -> str:
        parts = [f"dim={self.dim}", f"counts={list(self.counts)}"]
        if self.inner != 1:
            parts.append(f"inner={self.inner}")
        if self.outer != 1:
            parts.append(f"outer={self.outer}")
        return f"S({', '.join(parts)})"


@dataclass(frozen=True)
class OnRank:
    """The whole tensor on rank `rank` alone; no other rank computes it (see the module docstring)."""
    rank: int
    world_size: int

    def __str__(self) -> str:
        return f"on rank {self.rank}"


Layout = Union[Replicate, Shard, Partial, OnRank]


def on_one_rank(layout) -> bool:
    """Whether a value of `layout` (a Layout, a tuple of them, or None) is held on one rank alone."""
    return any(isinstance(x, OnRank) for x in (layout if isinstance(layout, tuple) else (layout,)))


def held_by(layout, rank: int) -> bool:
    """Whether `rank` computes a value of `layout` (a Layout, a tuple of them, or None): all but
    values on another rank alone."""
    layouts = layout if isinstance(layout, tuple) else (layout,)
    return not layouts or not all(isinstance(x, OnRank) and x.rank != rank for x in layouts)


def local_numel(numel: int, layout, rank: int) -> int:
    """Elements of a tensor of `numel` elements that `rank` holds under `layout`."""
    return numel // layout.global_size * layout.local_size(rank) if isinstance(layout, Shard) else numel


def balanced_counts(units: int, world_size: int) -> tuple[int, ...]:
    """Split `units` over ranks as evenly as possible, larger parts first (14 on 4 -> 4,4,3,3)."""
    base, extra = divmod(units, world_size)
    return tuple(base + (1 if r < extra else 0) for r in range(world_size))


def same_placement(a: Shard, b: Shard) -> bool:
    """True when both shards put the same global elements on every rank (on the same dim). A
    symbolic `outer` must be the same expression, the blocks inside it placed the same."""
    if a == b:
        return True
    if a.dim != b.dim or a.world_size != b.world_size:
        return False
    if a.symbolic or b.symbolic:
        if not (isinstance(a.inner, int) and isinstance(b.inner, int)) or sympy.cancel(a.outer - b.outer) != 0:
            return False
        a, b = Shard(a.dim, a.counts, a.inner), Shard(b.dim, b.counts, b.inner)
    if a.global_size != b.global_size:
        return False
    return all(a.owned_ranges(r) == b.owned_ranges(r) for r in range(a.world_size))
