"""Sum Partial terms before adding replicated ones, so a block needs one all_reduce, not two.

Reads:  node.meta["fxtp.layout"] (from propagate) of aten.add.Tensor trees: adds whose
        intermediate results have no other user.
Writes: rebuilds a tree with two or more Partial leaves and at least one replicated leaf as
        ((P1 + P2 + ...) + R1) + R2 ...; the new adds take the root's meta["val"] (the Partial
        sum must already have the root's shape, else the tree is left alone). Run propagate again
        afterwards.

    before (GPT-J, parallel residual; biases split)      after
    t = add(attn_o, b_o)      P + R: all_reduce            p = add(attn_o, mlp_o)   P + P
    u = add(mlp_o, b_fc)      P + R: all_reduce            t = add(p, b_o)          all_reduce once
    y = add(add(t, u), res)                                y = add(add(t, b_fc), res)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.node_meta import LAYOUT, copy_origin
from fxtp.sharding.layouts import Partial

aten = torch.ops.aten


def _is_plain_add(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.add.Tensor \
        and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)


def _leaves(node: fx.Node, root: fx.Node) -> list[fx.Node]:
    if not _is_plain_add(node) or (node is not root and len(node.users) != 1):
        return [node]
    return [leaf for arg in node.args for leaf in _leaves(arg, root)]


def _partial_leaf(leaf: fx.Node) -> bool:
    return leaf.meta.get(LAYOUT) == Partial()


def reassociate_partials(gm: fx.GraphModule) -> bool:
    """Rebuild add trees as above; returns whether anything changed."""
    changed = False
    roots = [n for n in gm.graph.nodes  # an add that is not itself an inner node of a larger tree
             if _is_plain_add(n) and not (len(n.users) == 1 and _is_plain_add(next(iter(n.users))))]
    for root in roots:
        leaves = _leaves(root, root)
        if len(leaves) < 3:
            continue
        partials = [leaf for leaf in leaves if _partial_leaf(leaf)]
        others = [leaf for leaf in leaves if not _partial_leaf(leaf)]
        if len(partials) < 2 or not others or not any(val_shape(p) == val_shape(root) for p in partials):
            continue
        ordered = partials + others
        if _already(root, ordered):
            continue
        with gm.graph.inserting_before(root):
            total = ordered[0]
            for leaf in ordered[1:]:
                total = gm.graph.call_function(aten.add.Tensor, (total, leaf))
                copy_origin(root, total, value=True)
        root.replace_all_uses_with(total)
        _erase_tree(gm, root)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def val_shape(node: fx.Node):
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _already(root: fx.Node, ordered: list[fx.Node]) -> bool:
    """The tree is already a left fold of `ordered`."""
    node = root
    for leaf in reversed(ordered[1:]):
        if not _is_plain_add(node) or node.args[1] is not leaf:
            return False
        node = node.args[0]
    return node is ordered[0]


def _erase_tree(gm: fx.GraphModule, node: fx.Node) -> None:
    args = [a for a in node.args if _is_plain_add(a) and len(a.users) == 1]
    gm.graph.erase_node(node)
    for arg in args:
        if not arg.users:
            _erase_tree(gm, arg)
