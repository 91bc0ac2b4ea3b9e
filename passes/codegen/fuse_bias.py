"""Put biases back into the GEMMs of a rank graph (the inverse of split_bias where it is local).

Reads:  rank-graph nodes `p = linear(x, W)` / `p = mm(x, W)` whose only user is
        `y = add(p, b)` with `b` a 1-D get_attr (a bias held by this rank).
Writes: `y = linear(x, W, b)` / `y = addmm(b, x, W)`; one kernel instead of two in eager mode.
Row-parallel biases are added after an all_reduce, so their add reads the collective's output,
not the product, and stays as it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

aten = torch.ops.aten


def fuse_bias(gm: fx.GraphModule) -> fx.GraphModule:
    for add in list(gm.graph.nodes):
        if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
            continue
        product, bias = add.args
        if not (isinstance(product, fx.Node) and product.target in (aten.linear.default, aten.mm.default)
                and len(product.args) == 2 and len(product.users) == 1
                and isinstance(bias, fx.Node) and bias.op == "get_attr"
                and operator.attrgetter(bias.target)(gm).dim() == 1):
            continue
        x, w = product.args
        with gm.graph.inserting_before(add):
            fused = gm.graph.call_function(aten.linear.default, (x, w, bias)) if product.target is aten.linear.default \
                else gm.graph.call_function(aten.addmm.default, (bias, x, w))
        fused.meta.update(add.meta)
        add.replace_all_uses_with(fused)
        gm.graph.erase_node(add)
        gm.graph.erase_node(product)
    gm.graph.lint()
    gm.recompile()
    return gm
