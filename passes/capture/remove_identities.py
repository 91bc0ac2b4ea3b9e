"""Drop nodes that return their input unchanged in an inference graph.

Reads:  aten.dropout with train=False, aten.alias, and casts (to / _to_copy / type_as) whose
        output has the input's dtype and device (node.meta["val"]).
Writes: every use of such a node now reads its input; the node is erased.

Why: fewer nodes to run per token, and sums stay visible as sums (GPT-J's attention and MLP
outputs pass through dropout before the residual add; reassociate_partials needs to see the adds).
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is aten.dropout.default:
        return node.args[2] is False if len(node.args) > 2 else node.kwargs.get("train") is False
    if node.target is aten.alias.default:
        return True
    if node.target in _CASTS:
        src, out = node.args[0].meta.get("val"), node.meta.get("val")
        return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dtype == out.dtype \
            and src.device == out.device and src.shape == out.shape
    return False


def remove_identities(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
