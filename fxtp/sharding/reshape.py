"""How a Shard moves through view/reshape: dims are matched in groups of equal product.

Sizes may be symbolic (batch, sequence); they are compared as sympy expressions, so `s0*64`
groups with `[s0, 4, 16]` without knowing s0.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import sympy
import torch

from fxtp.sharding.layouts import Shard


def as_expr(size) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    if isinstance(size, sympy.Expr):
        return size
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
    """The Shard of a reshape's output, or None when the owned elements are not one output dim.
    A shard merged with batch or sequence gets a symbolic outer/inner: [b, 4 heads, s, d] ->
    [b*4, s, d] is Shard(0, outer=b), and the split back [b*4, s, s] -> [b, 4, s, s] recovers
    the heads."""
    return _reshape_shard(shard, tuple(as_expr(s) for s in in_shape), tuple(as_expr(s) for s in out_shape))


@lru_cache(maxsize=4096)
def _reshape_shard(shard: Shard, ins: tuple, outs: tuple) -> Optional[Shard]:
    groups = _dim_groups(ins, outs)
    if groups is None:
        return _in_same_end(shard, ins, outs)
    for gi, gj in groups:
        if shard.dim not in gi:
            continue
        if not gj:
            return None
        in_sizes, out_sizes = [ins[d] for d in gi], [outs[d] for d in gj]
        pos = gi.index(shard.dim)
        outer = as_expr(shard.outer) * sympy.Mul(*in_sizes[:pos])
        inner = as_expr(shard.inner) * sympy.Mul(*in_sizes[pos + 1:])
        splits = [(d, sympy.Mul(*out_sizes[:k]), sympy.Mul(*out_sizes[k + 1:]), out_sizes[k])
                  for k, d in enumerate(gj)]
        for d, pre, post, size in splits:  # a dim holding whole units of the shard
            if _divides(pre, outer) and _divides(post, inner) and \
                    sympy.cancel(size - outer / pre * shard.units * inner / post) == 0:
                return Shard(d, shard.counts, _plain(inner / post), _plain(outer / pre))
        for d, pre, post, size in splits:  # else one holding groups of units, each rank whole groups
            coarser = _coarser(shard, sympy.cancel(post / inner))
            if _divides(pre, outer) and coarser is not None and sympy.cancel(size - outer / pre * coarser.units) == 0:
                return Shard(d, coarser.counts, 1, _plain(outer / pre))
        return None
    return None


def _in_same_end(shard: Shard, ins: tuple, outs: tuple) -> Optional[Shard]:
    """The shard where its dim and all dims after it (or before it) are the same in both shapes, which
    pairs where the sizes between do not (Mamba-2's sequence padded to whole chunks, [b, s', h, d] ->
    [b, s' // 256, 256, h, d]): an element's coordinates in those dims do not change."""
    same = lambda a, b: len(a) == len(b) and all(sympy.cancel(x - y) == 0 for x, y in zip(a, b))  # noqa: E731
    after = len(ins) - shard.dim
    if after <= len(outs) and same(ins[shard.dim:], outs[len(outs) - after:]):
        return shard.with_dim(len(outs) - after)
    if shard.dim < len(outs) and same(ins[:shard.dim + 1], outs[:shard.dim + 1]):
        return shard
    return None


def _coarser(shard: Shard, ratio: sympy.Expr) -> Optional[Shard]:
    """`shard` in units `ratio` times as large, where every rank's count is a whole number of them:
    [.., 8 heads, d] -> [.., 2 groups, 4 heads, d] with 4 heads a rank is one group a rank (Falcon's
    fused q|k|v of kv-head groups)."""
    if not ratio.is_Integer or int(ratio) < 2 or any(c % int(ratio) for c in shard.counts):
        return None
    return Shard(shard.dim, tuple(c // int(ratio) for c in shard.counts))


def _plain(e: sympy.Expr):
    """An int where the expression is a number (every static Shard holds ints)."""
    e = sympy.cancel(e)
    return int(e) if e.is_Integer else e
