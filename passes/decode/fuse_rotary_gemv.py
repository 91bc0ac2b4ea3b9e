"""Fuse a layer's q|k|v projection, rotary embedding and KV-cache write into one node (a decode
step's twin, `DecodeOptions.rotary_gemv`, fxtp/decode/options.py).

Reads:  `q, k, v = split_with_sizes(linear(x, W[, b]), [H*D, KV*D, KV*D], -1)` (q, k and v merged by
        passes/decode/merge_projections.py), each piece `transpose(view(piece, [B, S, -1, D]), 1, 2)`; q's
        and k's rotated as HF's `apply_rotary_pos_emb` does it,
            `t * unsqueeze(cos, 1) + cat([-t[..., D/2:], t[..., :D/2]], -1) * unsqueeze(sin, 1)`
        (the same cos and sin for both), or as Phi-3's does it over all of D,
            `cat([that, t[..., D:]], -1)`; rotated k and v written by `index_copy_(cache, 2,
        position, .)` at one position tensor. Every node between the linear and the writes has no
        user outside the pattern, but rotated q, read by attention after the writes.
Writes: `rotary_projection(x, W, b, cos, sin, position, key_cache, value_cache, H, prefetch_bytes=.)`
        (fxtp/kernels/rotary_gemv.py) before the first write, with rotated q's meta; readers of rotated q
        read it, readers of the writes' results read the caches. The pattern's nodes are erased.
        Then every layer's position reads the first position of equal value (HF's static cache
        computes one per layer), and the others are erased where nothing else reads them.

Why: the unfused step runs the q|k|v GEMV and then three latency-bound kernels (q's rotation, k's
with its cache write, v's cache write) before attention; fxtp/kernels/rotary_gemv.py does all of it in the
GEMV's epilogue. Inductor computes an op's inputs in kernels before it, so a position of each
layer's own would cost a kernel a layer; one shared position costs one a step.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxtp.passes.node_match import only_user, value_key
from fxtp.kernels.rotary_gemv import rotary_projection

aten = torch.ops.aten


def fuse_rotary_gemv(gm: fx.GraphModule, prefetch_bytes: int) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.split_with_sizes.default:
            match = _match(node)
            if match is not None:
                _fuse(graph, match, prefetch_bytes)
    _share_positions(graph)
    graph.lint()
    gm.recompile()
    return gm


def _call(node, target, arity: Optional[int] = None) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target
            and (arity is None or len(node.args) == arity))


def _heads(piece: fx.Node, head_dim: Optional[int]) -> Optional[tuple[fx.Node, int]]:
    """(transpose, D) where `piece` is only read by `transpose(view(piece, [B, S, -1, D]), 1, 2)`."""
    view = only_user(piece)
    if not _call(view, aten.view.default) or len(view.args[1]) != 4 or view.args[1][2] != -1:
        return None
    transpose = only_user(view)
    if not _call(transpose, aten.transpose.int) or tuple(transpose.args[1:]) != (1, 2):
        return None
    dim = view.args[1][3]
    return (transpose, dim) if isinstance(dim, int) and dim % 2 == 0 and dim == (head_dim or dim) else None


def _rotation(t: fx.Node, half: int) -> Optional[tuple]:
    """(rotated, cos, sin, nodes) where t's only readers compute HF's rotation of t."""
    users = list(t.users)
    slices = {(u.args[2], u.args[3]): u for u in users if _call(u, aten.slice.Tensor, 4) and u.args[1] in (3, -1)}
    products = [u for u in users if _call(u, aten.mul.Tensor, 2) and u.args[0] is t]
    upper, lower = slices.get((half, 2 ** 63 - 1)), slices.get((0, half))
    passed = slices.get((2 * half, 2 ** 63 - 1))  # Phi-3's part past the rotary dim: empty where that is all of D
    if len(users) != 3 + (passed is not None) or len(products) != 1 or upper is None or lower is None:
        return None
    negated = only_user(upper)
    joined = only_user(negated) if _call(negated, aten.neg.default, 1) else None
    if not (_call(joined, aten.cat.default) and list(joined.args[0]) == [negated, lower]
            and joined.args[1:] in ((-1,), (3,)) and only_user(lower) is joined):
        return None
    turned, straight = only_user(joined), products[0]
    rotated = only_user(straight)
    if not (_call(turned, aten.mul.Tensor, 2) and turned.args[0] is joined and _call(rotated, aten.add.Tensor, 2)
            and set(rotated.args) == {straight, turned} and only_user(turned) is rotated):
        return None
    cos, sin = straight.args[1], turned.args[1]
    if not all(_call(s, aten.unsqueeze.default, 2) and s.args[1] == 1 for s in (cos, sin)):
        return None
    nodes = [rotated, turned, straight, joined, negated, upper, lower]
    if passed is None:
        return rotated, cos, sin, nodes
    rejoined = only_user(rotated)
    if not (_call(rejoined, aten.cat.default) and list(rejoined.args[0]) == [rotated, passed]
            and rejoined.args[1:] in ((-1,), (3,)) and only_user(passed) is rejoined):
        return None
    return rejoined, cos, sin, [rejoined, passed, *nodes]


def _cache_write(node: Optional[fx.Node]) -> Optional[fx.Node]:
    """`node`'s only reader if it is `index_copy_(cache, 2, position, node)`."""
    write = only_user(node) if node is not None else None
    return write if _call(write, aten.index_copy_.default, 4) and write.args[1] == 2 and write.args[3] is node else None


def _match(split: fx.Node) -> Optional[dict]:
    projection, sizes = split.args[:2]
    if len(split.args) != 3 or split.args[2] != -1 or len(sizes) != 3 or sizes[1] != sizes[2]:
        return None
    if not (_call(projection, aten.linear.default) and not projection.kwargs and only_user(projection) is split):
        return None
    pieces = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    if len(split.users) != 3 or set(pieces) != {0, 1, 2}:
        return None
    q = _heads(pieces[0], None)
    k, v = (_heads(pieces[i], q[1]) if q else None for i in (1, 2))
    if q is None or k is None or v is None or sizes[0] % q[1]:
        return None
    half = q[1] // 2
    q_rotation, k_rotation = _rotation(q[0], half), _rotation(k[0], half)
    if q_rotation is None or k_rotation is None or q_rotation[1:3] != k_rotation[1:3]:
        return None
    key_write, value_write = _cache_write(k_rotation[0]), _cache_write(v[0])
    if key_write is None or value_write is None or key_write.args[2] is not value_write.args[2]:
        return None
    order = {node: i for i, node in enumerate(split.graph.nodes)}
    first_write = min(key_write, value_write, key=order.get)
    if any(order[user] < order[first_write] for user in q_rotation[0].users):
        return None
    return {"projection": projection, "heads": sizes[0] // q[1], "rotation": q_rotation, "first_write": first_write,
            "writes": (key_write, value_write), "dead": [key_write, value_write, *q_rotation[3], *k_rotation[3],
                                                         *(t for t, _ in (q, k, v)),
                                                         *(t.args[0] for t, _ in (q, k, v)), *pieces.values(),
                                                         split, projection]}


def _fuse(graph: fx.Graph, match: dict, prefetch_bytes: int) -> None:
    projection = match["projection"]
    x, weight, bias = (*projection.args, None)[:3]
    rotated, cos, sin, _ = match["rotation"]
    key_write, value_write = match["writes"]
    with graph.inserting_before(match["first_write"]):
        q = graph.call_function(rotary_projection, (x, weight, bias, cos.args[0], sin.args[0], key_write.args[2],
                                                    key_write.args[0], value_write.args[0], match["heads"]),
                                {"prefetch_bytes": prefetch_bytes})
    q.meta = dict(rotated.meta)
    rotated.replace_all_uses_with(q)
    for write in match["writes"]:
        write.replace_all_uses_with(write.args[0])
    for node in match["dead"]:
        graph.erase_node(node)
    for unsqueezed in {cos, sin}:
        if not unsqueezed.users:
            graph.erase_node(unsqueezed)


def _share_positions(graph: fx.Graph) -> None:
    order = {node: i for i, node in enumerate(graph.nodes)}
    first: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if node.target is rotary_projection:
            position = node.args[5]
            key = value_key(position, order[node], order)
            if key is None:
                continue
            shared = first.setdefault(key, position)
            # the shared tensor is only ever read: its readers are rotary nodes, which write the caches
            if shared is not position and all(user.target is rotary_projection and shared not in user.args[6:8]
                                               for user in shared.users):
                node.replace_input_with(position, shared)
                _erase_unread(graph, position)


def _erase_unread(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` if nothing reads it, then so for what it read (value_key's ops write nothing)."""
    if node.users or node.op != "call_function":
        return
    read = node.all_input_nodes
    graph.erase_node(node)
    for value in read:
        _erase_unread(graph, value)
