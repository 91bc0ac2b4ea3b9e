"""Views that move or regroup dims: reshape and its kin, expand, transpose and permute, complex views.

The sharded dim is followed to where it lands; a reshape that would split a shard's owned part
over several dims replicates instead. Shape arguments are made local per rank (`localize_shape_list`).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard, same_placement
from fxtp.sharding.reshape import reshape_shard
from fxtp.sharding.op_rules.helpers import R, ndim, norm_dim, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

aten = torch.ops.aten
# ops that only reorder dims (permutation says how)
PERMUTES = frozenset({aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default})


def reshape(node: fx.Node, lay: LayoutOf) -> Decision:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: follow the sharded dim through the
    groups of dims whose products match; fails (replicate) if the owned part is not one dim."""
    src = node.args[0]
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout)
    out = reshape_shard(layout, val(src).shape, val(node).shape)
    if out is None:
        return Decision(R, {src: R}, f"reshape {list(val(src).shape)} -> {list(val(node).shape)} splits a shard")
    return Decision(out)


def localize_shape_list(arg_index: int, first_dim: Callable = lambda node: 0):
    """Replace the size of the sharded output dim in a size-list argument with the local size.
    A symbolic size (Bloom's batch*heads, a node of the rank graph) becomes
    size // units * counts[rank], computed in the rank graph."""

    def localize(node, args, kwargs, out, rank):
        if not isinstance(out, Shard):
            return args, kwargs
        sizes = list(args[arg_index])
        k = out.dim - first_dim(node)
        if 0 <= k < len(sizes) and isinstance(sizes[k], int) and sizes[k] != -1:
            sizes[k] = out.local_size(rank)
        elif 0 <= k < len(sizes) and isinstance(sizes[k], fx.Node):
            graph = sizes[k].graph
            per_unit = graph.call_function(operator.floordiv, (sizes[k], out.units))
            sizes[k] = graph.call_function(operator.mul, (per_unit, out.counts[rank]))
        return args[:arg_index] + (sizes,) + args[arg_index + 1:], kwargs

    return localize


def unflatten_first_dim(node: fx.Node) -> int:
    """The dim unflatten(x, dim, sizes) splits: its sizes argument starts there."""
    return norm_dim(node.args[1], ndim(node.args[0]))


localize_unflatten = localize_shape_list(2, first_dim=unflatten_first_dim)


def expand(node: fx.Node, lay: LayoutOf) -> Decision:
    src = node.args[0]
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout)
    out = layout.with_dim(layout.dim + ndim(node) - ndim(src))
    if val(node).shape[out.dim] != val(src).shape[layout.dim]:
        return Decision(R, {src: R}, "expand broadcasts a sharded dim")
    return Decision(out)


def expand_as(node: fx.Node, lay: LayoutOf) -> Decision:
    """expand_as(x, other): other's shape, which a rank reads off its local `other`. Where `other` is
    sharded and x broadcasts along that dim (or is sharded there the same way), each rank's piece is
    its shard of the global expansion (XLM's mask expanded to its head-sharded scores); where `other`
    is whole, x is expanded as by `expand`, a sharded dim of x made whole first."""
    src, other = node.args[0], node.args[1]
    layout, shape = lay(src), lay(other)
    if not isinstance(shape, Shard):
        return Decision(layout) if not isinstance(layout, Shard) else \
            Decision(R, {src: R}, "expand_as to a whole tensor's shape from a sharded one")
    dim = shape.dim - (ndim(node) - ndim(src))  # of x, where other is sharded
    if isinstance(layout, Shard) and layout.dim == dim and same_placement(layout.with_dim(shape.dim), shape):
        return Decision(shape)
    if dim < 0 or val(src).shape[dim] == 1:  # copies along the sharded dim: any rank's piece is its shard
        return Decision(shape, {src: R} if not isinstance(layout, Replicate) else {})
    return Decision(shape, {src: shape.with_dim(dim)})


def permutation(node: fx.Node) -> list[int]:
    """perm[i] = the input dim that becomes output dim i."""
    nd = ndim(node.args[0])
    if node.target in (aten.transpose.int,):
        a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if node.target in (aten.permute.default,):
        return [norm_dim(d, nd) for d in node.args[1]]
    return list(reversed(range(nd)))  # t, numpy_T


def permute(node: fx.Node, lay: LayoutOf) -> Decision:
    layout = lay(node.args[0])
    if not isinstance(layout, Shard):
        return Decision(layout)
    return Decision(layout.with_dim(permutation(node).index(layout.dim)))


def complex_view(node: fx.Node, lay: LayoutOf) -> Decision:
    """view_as_complex(x[..., 2]) -> [...] and view_as_real(z[...]) -> [..., 2] (Llama 4's rotary):
    the last dim of size 2 is the (real, imaginary) pair, so a shard of any other dim (heads) keeps
    its place. A Partial is summed first: complex sums are not what collectives are made for."""
    src = node.args[0]
    layout = lay(src)
    if isinstance(layout, Partial) or isinstance(layout, Shard) and layout.dim >= ndim(node):
        return Decision(R, {src: R}, f"{node.target} of a Partial or of a shard of the (real, imaginary) pair")
    return Decision(layout)
