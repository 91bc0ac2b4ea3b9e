"""How a Shard moves through view/reshape: dims are matched in groups of equal product.

Sizes may be symbolic (batch, sequence); they are compared as sympy expressions, so `s0*64`
groups with `[s0, 4, 16]` without knowing s0.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import Optional, Sequence

import sympy
import torch

from fxtp.layouts import Shard


def as_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _divides(a: sympy.Expr, b: sympy.Expr) -> bool:
    if a.is_Integer and b.is_Integer:
        return int(b) % int(a) == 0
    return sympy.fraction(sympy.cancel(b / a))[1] == 1


def dim_groups(in_shape: Sequence, out_shape: Sequence) -> Optional[tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]:
    """Pair runs of input dims with runs of output dims of equal product, or None if none exist."""
    return _dim_groups(tuple(as_expr(s) for s in in_shape), tuple(as_expr(s) for s in out_shape))


@lru_cache(maxsize=4096)  # a model repeats the same few reshapes in every layer
def _dim_groups(ins: tuple, outs: tuple) -> Optional[tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]:
    groups = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [], []
        p_in = p_out = sympy.Integer(1)
        if i < len(ins):
            gi.append(i); p_in *= ins[i]; i += 1
        if j < len(outs):
            gj.append(j); p_out *= outs[j]; j += 1
        while p_in != p_out:
            if i < len(ins) and _divides(p_in, p_out):
                gi.append(i); p_in *= ins[i]; i += 1
            elif j < len(outs) and _divides(p_out, p_in):
                gj.append(j); p_out *= outs[j]; j += 1
            else:
                return None
        groups.append((tuple(gi), tuple(gj)))
    return tuple(groups)


def reshape_shard(shard: Shard, in_shape: Sequence, out_shape: Sequence) -> Optional[Shard]:
    """The Shard of a reshape's output, or None when the owned elements are not one output dim."""
    groups = dim_groups(in_shape, out_shape)
    if groups is None:
        return None
    for gi, gj in groups:
        if shard.dim not in gi:
            continue
        in_sizes, out_sizes = [as_expr(in_shape[d]) for d in gi], [as_expr(out_shape[d]) for d in gj]
        if not gj or not all(e.is_Integer for e in in_sizes + out_sizes):
            return None  # a shard merged with batch or sequence (Bloom's [b*heads, s, d]) stays whole
        pos = gi.index(shard.dim)
        before = prod(int(in_shape[d]) for d in gi[:pos]) if pos else 1
        after = prod(int(in_shape[d]) for d in gi[pos + 1:]) if pos + 1 < len(gi) else 1
        outer, inner = shard.outer * before, shard.inner * after
        for k, d in enumerate(gj):
            pre = prod(int(s) for s in out_sizes[:k]) if k else 1
            post = prod(int(s) for s in out_sizes[k + 1:]) if k + 1 < len(gj) else 1
            if outer % pre == 0 and inner % post == 0 and int(out_sizes[k]) == (outer // pre) * shard.units * (inner // post):
                return Shard(d, shard.counts, inner // post, outer // pre)
        return None
    return None
