"""Ops that make tensors: factories (arange, zeros, new_ones) and *_like."""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Shard
from fxtp.sharding.op_rules.helpers import R, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf


def fresh(node, lay) -> Decision:
    """Factories (arange, zeros, new_ones): the same full tensor on every rank."""
    return Decision(R if isinstance(val(node), torch.Tensor) else None)


def like(node: fx.Node, lay: LayoutOf) -> Decision:
    """zeros_like/empty_like/ones_like/full_like: same shape as the input; never a Partial."""
    layout = lay(node.args[0])
    return Decision(layout if isinstance(layout, Shard) else R)
