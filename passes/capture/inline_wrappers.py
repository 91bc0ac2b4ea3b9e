"""Inline the context-manager wrappers torch.export leaves around parts of a graph.

Reads:  call_function nodes of `wrap_with_autocast` / `wrap_with_set_grad_enabled` (a
        higher-order op whose body is a get_attr submodule) and their getitem users.
Writes: the body's nodes in place of the wrapper (node.meta copied with the nodes); the
        submodule and its get_attr are removed.

    before                                       after
    body = get_attr[submod_1]
    out = wrap_with_autocast(cpu, bf16, False,   y = mul(x, 2)      # body inlined
                             False, body, x)
    y = getitem(out, 0)

HF wraps rotary embeddings in `autocast(enabled=False)` (torch 2.11 keeps it as a wrapper,
2.13 does so for some models). fxtp captures inference graphs in the model's own dtype, so the
contexts change nothing there, and the body's ops need layout rules like any other.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

# matched by name: the operator objects are not the same across torch versions
_BODY_ARG = {
    "wrap_with_autocast": 4,          # (device, dtype, enabled, cache_enabled, body, *args)
    "wrap_with_set_grad_enabled": 1,  # (enabled, body, *args)
}


def _body_arg(node: fx.Node):
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return _BODY_ARG.get(node.target.name())
    return None


def inline_wrappers(gm: fx.GraphModule) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        body_index = _body_arg(node)
        if body_index is None:
            continue
        body_node = node.args[body_index]
        body = inline_wrappers(getattr(gm, body_node.target))  # a body's own wrappers first
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, node.args[body_index + 1:]))
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(body.graph, env)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise RuntimeError(f"unexpected user of {node.format_node()}: {user.format_node()}")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not body_node.users:
            gm.graph.erase_node(body_node)
            delattr(gm, body_node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
