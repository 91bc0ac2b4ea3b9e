"""What the fusion passes ask of a node while they match a chain of ops."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten


def only_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that reads `node`, or None if none or several do."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def writes(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` may write to `node` in place: an aten op whose schema marks that argument
    written, or a call of anything else (not known)."""
    if not isinstance(user.target, torch._ops.OpOverload):
        return True
    arguments = user.target._schema.arguments
    bound = list(zip(arguments, user.args)) + [(a, user.kwargs[a.name]) for a in arguments if a.name in user.kwargs]
    return any(a.alias_info is not None and a.alias_info.is_write and node in tree_flatten(value)[0]
               for a, value in bound)


def value_key(node: fx.Node, read_at: int, order: dict[fx.Node, int]) -> Optional[tuple]:
    """A key equal for nodes that hold equal values where read at graph position `read_at` (`order`:
    each node's position): the same functional aten ops over the same inputs and literals, none of
    them written in place before it is read. None where that is not certain."""
    if any(order[user] < read_at and writes(user, node) for user in node.users):
        return None
    if node.op == "placeholder":
        return ("input", node.target)
    target = node.target
    if (node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable
            or torch.Tag.nondeterministic_seeded in target.tags):
        return None
    leaves, spec = tree_flatten((node.args, node.kwargs))
    keys = [value_key(leaf, order[node], order) if isinstance(leaf, fx.Node) else ("literal", leaf) for leaf in leaves]
    return None if None in keys else (target, str(spec), *keys)
