"""Split biased projections into a bias-free product plus an add of the bias.

Reads:  aten.linear (x, W, b) and aten.addmm (b, x, W) nodes with a tensor bias.
Writes: replaces each with the product (node.meta["val"] and origin, fxtp.node_meta.ORIGIN, copied) and an
        aten.add.Tensor of the bias, so layout rules see the bias as its own operand.

    before                      after
    y = linear(x, W, b)         p = linear(x, W);   y = add(p, b)
    y = addmm(b, x, W)          p = mm(x, W);       y = add(p, b)

Why: a row-parallel product is a Partial, and its bias must be added once, after the
all_reduce; as a separate add, the Partial rules do exactly that (add(P, R) reduces first),
and for a column-parallel product the bias is sliced like the output. `fuse_bias` puts the
biases back into the GEMMs of each rank graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.node_meta import copy_origin

aten = torch.ops.aten


def split_bias(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
            x, w, b = node.args
            target, args = aten.linear.default, (x, w)
        elif node.target is aten.addmm.default and not node.kwargs:
            b, x, w = node.args[:3]
            target, args = aten.mm.default, (x, w)
        else:
            continue
        with gm.graph.inserting_before(node):
            product = gm.graph.call_function(target, args)
            summed = gm.graph.call_function(aten.add.Tensor, (product, b))
        for new in (product, summed):
            copy_origin(node, new, value=True)
        node.replace_all_uses_with(summed)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
