"""Merge the projections that read the same input into one (a decode step's twin,
`DecodeOptions.merge_projections`, fxtp/decode/options.py).

Reads:  `aten.linear(x, W)` and `aten.linear(x, W, b)` nodes with no kwargs whose weight (and
        bias) are get_attr tensors of `gm` that no other node reads, grouped by their input `x`.
        A group is two or more such projections with weights of one dtype and device, all with a
        bias (of one dtype) or none.
Writes: per group, a weight `merged_<first weight>` (and bias `merged_<first bias>`) registered
        on `gm`, whose rows are the group's weights in graph order, and

    before (a rank's Llama attention)          after
    q = linear(x, Wq)                          p = linear(x, merged_Wq)
    k = linear(x, Wk)                          q, k, v = split_with_sizes(p, [hq, hk, hv], -1)
    v = linear(x, Wv)

        before the group's first projection; each getitem takes the meta of the projection it
        replaces (the merged linear and the split get none). The projections, their get_attr
        nodes and `gm`'s attributes for them are removed.

The group's weight (and bias) tensor objects are re-pointed (`Tensor.set_`) to views of the
merged tensor, so the other programs of the rank that hold them (the prefill, eager steps) read
the same memory and no weight is held twice. A second call on the same weights (another batch
size) finds them adjacent in one tensor already and merges without a copy.

Why: at batch 1 a projection is a GEMV, and a rank's q, k and v are small ones whose time is more
latency than bytes. Inductor already reduces gate and up in one kernel (same output size), but
not q with k|v; one GEMV over the three reads the same bytes in one launch.
"""
from __future__ import annotations

import operator
from collections import Counter, defaultdict

import torch
import torch.fx as fx

aten = torch.ops.aten


def merge_projections(gm: fx.GraphModule) -> fx.GraphModule:
    graph = gm.graph
    reads = Counter(id(operator.attrgetter(n.target)(gm)) for n in graph.nodes if n.op == "get_attr")
    groups = defaultdict(list)
    for node in graph.nodes:
        operands = _operands(gm, node, reads)
        if operands is not None:
            weight, bias = operands
            groups[(node.args[0], weight.dtype, weight.device, bias is None or bias.dtype)].append((node, *operands))
    with torch.no_grad():
        for members in groups.values():
            if len(members) > 1:
                _merge(gm, members)
    graph.lint()
    gm.recompile()
    return gm


def _operands(gm: fx.GraphModule, node: fx.Node, reads: Counter):
    """(weight, bias or None) where `node` is a projection this pass merges, else None."""
    if node.target is not aten.linear.default or node.kwargs or len(node.args) not in (2, 3):
        return None
    tensors = []
    for arg in node.args[1:]:
        if arg is None:
            tensors.append(None)
            continue
        if not (isinstance(arg, fx.Node) and arg.op == "get_attr" and len(arg.users) == 1):
            return None
        tensor = operator.attrgetter(arg.target)(gm)
        if not isinstance(tensor, torch.Tensor) or reads[id(tensor)] != 1:
            return None
        tensors.append(tensor)
    weight, bias = tensors if len(tensors) == 2 else (tensors[0], None)
    return (weight, bias) if weight is not None and weight.dim() == 2 else None


def _merge(gm: fx.GraphModule, members: list[tuple]) -> None:
    """`members`: (projection, weight, bias or None) of one group, in graph order."""
    graph = gm.graph
    projections, weights, biases = zip(*members)
    first = projections[0]
    operands = [weights] if biases[0] is None else [weights, biases]
    names = [f"merged_{arg.target.replace('.', '_')}" for arg in first.args[1:1 + len(operands)]]
    for name, pieces in zip(names, operands):
        gm.register_buffer(name, _merged(pieces))
    with graph.inserting_before(first):
        merged = graph.call_function(aten.linear.default, (first.args[0], *map(graph.get_attr, names)))
        parts = graph.call_function(aten.split_with_sizes.default, (merged, [w.shape[0] for w in weights], -1))
        for i, projection in enumerate(projections):
            part = graph.call_function(operator.getitem, (parts, i))
            part.meta = dict(projection.meta)
            projection.replace_all_uses_with(part)
    for projection in projections:
        attrs = projection.args[1:1 + len(operands)]
        graph.erase_node(projection)
        for attr in attrs:
            graph.erase_node(attr)
            owner, _, leaf = attr.target.rpartition(".")
            delattr(gm.get_submodule(owner), leaf)


def _merged(pieces: list[torch.Tensor]) -> torch.Tensor:
    """One tensor whose rows are `pieces` in order, each piece set to be a view of its rows."""
    head = pieces[0]
    if _adjacent(pieces):
        rows = sum(p.shape[0] for p in pieces)
        return head.new_empty(0).set_(head.untyped_storage(), head.storage_offset(), (rows, *head.shape[1:]),
                                      head.stride())
    merged = torch.cat(pieces)
    start = 0
    for piece in pieces:
        rows = merged.narrow(0, start, piece.shape[0])
        piece.set_(rows.untyped_storage(), rows.storage_offset(), rows.shape, rows.stride())
        start += piece.shape[0]
    return merged


def _adjacent(pieces: list[torch.Tensor]) -> bool:
    """Whether the contiguous `pieces` follow each other in one storage."""
    storage = pieces[0].untyped_storage().data_ptr()
    offset = pieces[0].storage_offset()
    for piece in pieces:
        if (not piece.is_contiguous() or piece.untyped_storage().data_ptr() != storage
                or piece.storage_offset() != offset or piece.shape[1:] != pieces[0].shape[1:]):
            return False
        offset += piece.numel()
    return True
