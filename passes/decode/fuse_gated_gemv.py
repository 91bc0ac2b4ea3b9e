"""Fuse a gated MLP's activation and product into its gate|up projection (a decode step's twin,
`DecodeOptions.gated_gemv`, fxtp/decode/options.py).

Reads:  `mul(act(gate), up)` (either order) where `gate, up` are the two equal halves (getitems 0
        and 1 of `split_with_sizes(p, [n, n], -1)`, `split(p, n, -1)` or `chunk(p, 2, -1)`) of
        `p = aten.linear(x, W[, b])`, `act` is `aten.silu` or `aten.gelu` (exact or tanh), and each of
        these nodes has no other user. Llama-style MLPs give it after passes/decode/merge_projections.py has
        merged gate and up; Phi-3's fused gate_up projection gives it as captured.
Writes: the product's node becomes `gated_projection(x, W, b, prefetch_bytes=..., activation=...)`
        (fxtp/kernels/gemv.py: the gated `fxtp::gemv`, which computes `act(x @ W[:n].T) * (x @ W[n:].T)`, where
        x holds one row; the same ops as before elsewhere); it keeps its meta. The linear, split,
        getitems and activation are erased.

Why: at batch 1 the unfused step runs the gate|up GEMV, then a kernel of its own for
`act(gate) * up` (stored for the down GEMV by passes/decode/store_gemv_inputs.py): a latency-bound
kernel a layer, with a launch between (benchmarks/results/decode_step_history.md). In the gated GEMV
the program that sums gate's row i also sums up's row i, and writes the product.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxtp.kernels.gemv import gated_projection

aten = torch.ops.aten
SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)


def fuse_gated_gemv(gm: fx.GraphModule, prefetch_bytes: int) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.mul.Tensor and len(node.args) == 2:
            fused = _match(gm, node)
            if fused is not None:
                _fuse(graph, node, *fused, prefetch_bytes)
    graph.lint()
    gm.recompile()
    return gm


def _activation(node) -> Optional[str]:
    """fxtp/kernels/gemv.py's name of the activation `node` applies, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or len(node.args) != 1:
        return None
    if node.target is aten.silu.default and not node.kwargs:
        return "silu"
    if node.target is aten.gelu.default and set(node.kwargs) <= {"approximate"}:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(node.kwargs.get("approximate", "none"))
    return None


def _half(gm: fx.GraphModule, node, index: int) -> Optional[fx.Node]:
    """The split `node` is getitem `index` of, if it is one of two equal halves of a projection's last dim."""
    if not (isinstance(node, fx.Node) and node.target is operator.getitem and node.args[1] == index
            and len(node.users) == 1):
        return None
    split = node.args[0]
    if split.op != "call_function" or split.target not in SPLITS or split.kwargs or len(split.users) != 2:
        return None
    projection, pieces, dim = (*split.args, 0)[:3]
    if (dim != -1 or projection.target is not aten.linear.default or projection.kwargs
            or len(projection.users) != 1 or getattr(projection.args[1], "op", None) != "get_attr"):
        return None
    rows = operator.attrgetter(projection.args[1].target)(gm).shape[0]
    if split.target is aten.split_with_sizes.default:
        halves = list(pieces) == [rows // 2] * 2 and rows % 2 == 0
    else:  # split into pieces of a size, or chunk into a number of pieces
        halves = pieces * 2 == rows if split.target is aten.split.Tensor else pieces == 2 and rows % 2 == 0
    return split if halves else None


def _match(gm: fx.GraphModule, product: fx.Node) -> Optional[tuple]:
    """(projection, activation name, nodes to erase) where `product` is `act(gate) * up` of one projection."""
    for activated, up in (product.args, reversed(product.args)):
        name = _activation(activated)
        if name is None or len(activated.users) != 1:
            continue
        split = _half(gm, activated.args[0], 0)
        if split is not None and _half(gm, up, 1) is split:
            return split.args[0], name, [activated, activated.args[0], up, split, split.args[0]]
    return None


def _fuse(graph: fx.Graph, product: fx.Node, projection: fx.Node, activation: str, dead: list,
          prefetch_bytes: int) -> None:
    x, weight, bias = (*projection.args, None)[:3]
    with graph.inserting_before(product):
        gated = graph.call_function(gated_projection, (x, weight, bias),
                                    {"prefetch_bytes": prefetch_bytes, "activation": activation})
    gated.meta = dict(product.meta)
    product.replace_all_uses_with(gated)
    graph.erase_node(product)
    for node in dead:
        graph.erase_node(node)
