"""Store the computed input of every matrix-vector product before the product, instead of
recomputing it in each of the product's programs (an inductor post-grad pass:
`DecodeOptions.store_gemv_inputs`, fxtp/decode/options.py).

Reads:  the post-grad aten graph; with `coordinate_descent_tuning`, inductor's decomposition has
        turned each matmul with one row into `sum(mul(unsqueeze(x, 2), unsqueeze(w, 0)), [1])`.
Writes: `node.meta["inductor_realize_to_strides"] = True` on each such `x` that is pointwise
        arithmetic (after any casts and views), which makes inductor store `x` in a buffer rather
        than inline its producer into the reduction.

Why: inductor inlines a pointwise producer into its consumer. For a GEMV that consumer is a
reduction over `x` split into programs of a few output features each, so every program reads the
producer's inputs and recomputes all of `x`: in a Llama MLP, the down projection recomputes
silu(gate) * up (an exp and a division per element) once per program. Stored first, it costs one
small kernel and the GEMV reads `x` once per program (benchmarks/mlp_latency.py times both;
figures in benchmarks/results/decode_step_history.md).

An input that is only a cast or a view of a buffer that exists already (attention's output) is
left alone: the GEMV reads that buffer in place, and storing it would add a copy kernel of its own,
about as long as the recomputation it saves.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from fxtp.node_meta import REALIZE

aten, prims = torch.ops.aten, torch.ops.prims


def gemv_input(node: fx.Node):
    """`x` of `sum(mul(unsqueeze(x, 2), unsqueeze(w, 0)), [1])`, else None."""
    if node.target is not aten.sum.dim_IntList or list(node.args[1]) != [1]:
        return None
    product = node.args[0]
    if not isinstance(product, fx.Node) or product.target is not aten.mul.Tensor:
        return None
    row, column = product.args
    if not all(isinstance(n, fx.Node) and n.target is aten.unsqueeze.default for n in (row, column)):
        return None
    return row.args[0] if (row.args[1], column.args[1]) == (2, 0) else None


# ops that cast or move a tensor without arithmetic
MOVES = {prims.convert_element_type.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
         aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
         aten.clone.default, aten.slice.Tensor, aten.select.int}


def computed(x: fx.Node) -> bool:
    """Whether `x` is pointwise arithmetic, seen through casts and views."""
    while x.op == "call_function" and x.target in MOVES:
        x = x.args[0]
    return x.op == "call_function" and torch.Tag.pointwise in getattr(x.target, "tags", ())


class StoreGemvInputs(CustomGraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in graph.nodes:
            x = gemv_input(node)
            if x is not None and computed(x):
                x.meta[REALIZE] = True

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
