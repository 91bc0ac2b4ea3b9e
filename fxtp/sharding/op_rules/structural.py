"""Graph bookkeeping rather than math: getitem of a multi-output op, sym_size, and ops with no
tensor output (asserts, symbolic-int arithmetic)."""
from __future__ import annotations

import torch.fx as fx

from fxtp.sharding.op_rules.helpers import R, ndim, norm_dim, shard_of
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def no_output(node, lay) -> Decision:
    return Decision(None)


def getitem(node: fx.Node, lay: LayoutOf) -> Decision:
    src, idx = node.args
    layout = lay(src)
    return Decision(layout[idx] if isinstance(layout, tuple) else None)


def sym_size(node: fx.Node, lay: LayoutOf) -> Decision:
    s = shard_of(node.args[0], lay)
    if s is not None and s.dim == norm_dim(node.args[1], ndim(node.args[0])):
        return Decision(None, {node.args[0]: R}, "size of a sharded dim")
    return Decision(None)
