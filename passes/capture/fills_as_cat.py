"""A tensor made empty and then filled slice by slice along one dim becomes the cat of what fills it.

Reads:  aten.new_empty / aten.empty buffers whose uses before any read are copy_s into slices
        (aten.slice.Tensor) that tile one dim, and node.meta["val"] of the buffer and the copies' sources.
Writes: a cat of the sources (each expanded to its slice's shape where copy_ broadcast it) in the
        buffer's place, with its meta["val"] and origin; the buffer, slices and copy_s are erased.

Why: MLA attention (DeepSeek-V2/V3) builds each head's key as `k = kv.new_empty(...)`,
`k[..., :nope].copy_(k_nope)`, `k[..., nope:].copy_(k_rope)`. Writes into slices of a buffer have no
layout to follow, so the keys were replicated and the heads' projections with them; a cat has a
rule (fxtp/sharding/op_rules/cut_and_join.py) that keeps the heads sharded. Fills that do not tile
one dim exactly, that read the buffer before it is full, or that cast are left as they are.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxtp.node_meta import copy_origin

aten = torch.ops.aten
EMPTY = (aten.new_empty.default, aten.empty.memory_format)
END = 2 ** 63 - 1  # `x[..., a:]` ends at this in aten.slice


def fills_as_cat(gm: fx.GraphModule) -> fx.GraphModule:
    order = None  # each node's place in the graph, counted again only after a rewrite
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in EMPTY:
            order = order or {n: i for i, n in enumerate(gm.graph.nodes)}
            fills = _tiling_fills(node, order)
            if fills is not None:
                _as_cat(gm.graph, node, *fills, order)
                order = None
    gm.graph.lint()
    gm.recompile()
    return gm


def _tiling_fills(buffer: fx.Node, order: dict) -> Optional[tuple[int, list[tuple[fx.Node, fx.Node]]]]:
    """(dim, [(slice, copy_)] in order along dim) when the buffer's first uses are copy_s into
    slices of one dim that cover it once, with sources of its dtype; None otherwise."""
    shape = buffer.meta["val"].shape
    fills, reads = [], []
    for user in buffer.users:
        copy = next(iter(user.users)) if user.target is aten.slice.Tensor and len(user.users) == 1 else None
        if copy is not None and copy.target is aten.copy_.default and copy.args[0] is user and not copy.users:
            fills.append((user, copy))
        else:
            reads.append(user)
    if not fills or any(order[r] < order[c] for r in reads for _, c in fills):
        return None
    spans = [_span(part, len(shape)) for part, _ in fills]
    if None in spans or len({dim for dim, _, _ in spans}) != 1:
        return None
    dim = spans[0][0]
    if not isinstance(shape[dim], int) or any(c.args[1].meta["val"].dtype != buffer.meta["val"].dtype
                                              or _expanded_shape(c) is False for _, c in fills):
        return None
    ordered = sorted(zip(spans, fills), key=lambda item: item[0][1])
    edges = [0] + [min(end, shape[dim]) for (_, _, end), _ in ordered]
    if any(start != edge for ((_, start, _), _), edge in zip(ordered, edges)) or edges[-1] != shape[dim]:
        return None
    return dim, [fill for _, fill in ordered]


def _span(part: fx.Node, rank: int) -> Optional[tuple[int, int, int]]:
    """(dim, start, end) of an aten.slice with step 1 and integer bounds; None for any other."""
    dim, start, end, step = (list(part.args[1:]) + [0, 0, END, 1][len(part.args) - 1:])[:4]
    if not all(isinstance(x, int) for x in (dim, start, end, step)) or step != 1 or start < 0:
        return None
    return (dim + rank if dim < 0 else dim), start, end


def _expanded_shape(copy: fx.Node):
    """The expand that makes copy_'s source its slice's shape: None where it has it already, False
    where a broadcast dim is symbolic (a graph's sizes are nodes, not the fake tensors' symbols)."""
    source, target = copy.args[1].meta["val"].shape, copy.args[0].meta["val"].shape
    if len(source) == len(target) and all(statically_known_true(a == b) for a, b in zip(source, target)):
        return None
    lead = len(target) - len(source)
    shape = [-1 if i >= lead and statically_known_true(source[i - lead] == size) else size
             for i, size in enumerate(target)]
    return shape if all(isinstance(size, int) for size in shape) else False


def _as_cat(graph: fx.Graph, buffer: fx.Node, dim: int, fills: list[tuple[fx.Node, fx.Node]], order: dict) -> None:
    after_fills = max((copy for _, copy in fills), key=order.__getitem__).next
    pieces = []
    with graph.inserting_before(after_fills):
        for part, copy in fills:
            source, shape = copy.args[1], _expanded_shape(copy)
            if shape is not None:  # copy_ broadcasts its source
                source = graph.call_function(aten.expand.default, (source, shape))
                copy_origin(copy, source)
                source.meta["val"] = part.meta["val"]
            pieces.append(source)
        cat = graph.call_function(aten.cat.default, (pieces, dim))
    copy_origin(buffer, cat, value=True)
    for part, copy in fills:
        graph.erase_node(copy)
        graph.erase_node(part)
    buffer.replace_all_uses_with(cat)
    graph.erase_node(buffer)
