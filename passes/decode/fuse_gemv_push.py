"""Fuse a projection into the push all_reduce after it (a decode step's twin with push all_reduce,
`DecodeOptions.gemv_push`, fxtp/decode/options.py).

Reads:  `fxtp::push_all_reduce(p, group)` and `fxtp::push_all_reduce_add_rms_norm(p, residual,
        weight, eps, dtype, group)` nodes (fxtp/kernels/push_all_reduce.py, passes/decode/fuse_add_rms_norm.py)
        whose input is `p = aten.linear(x, W[, b])` with no other user: a row-parallel projection,
        as a decode layer's o and down projections are.
Writes: the push node calls `projection_all_reduce(x, W, b, prefetch_bytes, group)` or
        `projection_all_reduce_add_rms_norm(x, W, b, prefetch_bytes, residual, weight, eps, dtype,
        group)` (fxtp/kernels/gemv_push.py: at one row, a GEMV that pushes its outputs to the peers and a
        push kernel that only sums) in place of the push op, keeping its meta and users; the linear
        is erased.
Leaves alone all_reduces of anything else (the vocab-parallel embedding's) and projections read
elsewhere too.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.kernels.gemv_push import projection_all_reduce, projection_all_reduce_add_rms_norm

aten = torch.ops.aten
FUSED = {torch.ops.fxtp.push_all_reduce.default: projection_all_reduce,
         torch.ops.fxtp.push_all_reduce_add_rms_norm.default: projection_all_reduce_add_rms_norm}


def fuse_gemv_push(gm: fx.GraphModule, prefetch_bytes: int) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in FUSED:
            continue
        projection = node.args[0]
        if (not isinstance(projection, fx.Node) or projection.target is not aten.linear.default
                or projection.kwargs or len(projection.users) != 1):
            continue
        x, weight, bias = (*projection.args, None)[:3]
        node.target = FUSED[node.target]
        node.args = (x, weight, bias, prefetch_bytes, *node.args[1:])
        graph.erase_node(projection)
    graph.lint()
    gm.recompile()
    return gm
