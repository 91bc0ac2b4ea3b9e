"""Ops acting along one dim (select, unbind, index_select, softmax, cumsum, topk, sort, ...):
any layout passes while that dim is not the sharded one."""
from __future__ import annotations

import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard
from fxtp.sharding.op_rules.helpers import R, ndim, norm_dim, out_count, tensor_inputs
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def along_dim(dim_arg: int = 1, removes_dim: bool = False, tuple_out: bool = False, keeps_partial: bool = True,
              default_dim: int = 0):
    """Ops acting along one dim (slice, select, split, softmax, cumsum, topk, index_select):
    fine while that dim is not the sharded one. `default_dim` is the schema's default, which
    export leaves out (split(x, 2) splits dim 0; topk and sort act on the last dim)."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        src = node.args[0]
        layout = lay(src)
        dim = node.args[dim_arg] if len(node.args) > dim_arg else node.kwargs.get("dim", default_dim)
        dim = norm_dim(dim, ndim(src))
        others = {n: R for n in tensor_inputs(node) if n is not src and not isinstance(lay(n), Replicate)}
        if isinstance(layout, Partial) and not keeps_partial:
            return _along_out(node, R, tuple_out, {src: R, **others}, f"{node.target} of a Partial")
        if isinstance(layout, Shard):
            if layout.dim == dim:
                return _along_out(node, R, tuple_out, {src: R, **others}, f"{node.target} along the sharded dim")
            if removes_dim and layout.dim > dim:
                layout = layout.with_dim(layout.dim - 1)
        return _along_out(node, layout, tuple_out, others)

    return rule


def _along_out(node, layout, tuple_out, wants, note=""):
    out = tuple(layout for _ in range(out_count(node))) if tuple_out else layout
    return Decision(out, wants, note)


def triangle(node: fx.Node, lay: LayoutOf) -> Decision:
    """tril / triu keep a triangle of the last two dims: a shard of another dim passes, and so does
    a Partial (zeroing entries is linear)."""
    src = node.args[0]
    layout = lay(src)
    if isinstance(layout, Shard) and layout.dim >= ndim(src) - 2:
        return Decision(R, {src: R}, f"{node.target} of the sharded dim")
    return Decision(layout)
