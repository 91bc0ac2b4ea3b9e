"""Split a chain of per-channel ops, a depthwise convolution among them, at the channel cuts after it.

Reads:  node.meta["val"]; split / split_with_sizes along channels, the chain of ops before it back
        to a projection or to a cat of the pieces the cut takes apart again: transposes, a depthwise
        conv1d, slices of other dims, unary ops and elementwise ops whose other operands broadcast
        along the channels (a padding mask), adds and multiplies by a value per channel (Falcon-H1's
        µP multipliers), and unfuse_projections' flatten(unflatten(x)) (dropped).
Writes: per piece, the chain replayed on that piece's channels: a slice of the projection output
        (or the cat's input), the conv on the block of its weight and bias (groups = the piece's
        channels), a per-channel operand sliced alike; each node gets meta["val"] (the op on fake
        values) and the origin keys of the node it replays. A conv weight or bias that is state (read
        through squeezes of other dims) gets a state placeholder per block, as unfuse_projections
        makes them ("conv1d.weight[0:128]", its tensor added to `state`), so a rank can hold its
        block sharded; the whole one is removed. The cut's getitems read the replays; the old chain
        is left to dead code elimination.

    before (Mamba-2: in_proj's x|B|C piece, conv'd as one)   after
    p = linear(h, W_xBC); c = conv1d(p.T, w, b, groups=1152)  x = silu(conv1d(p[.., 0:128].T, w[0:128], b[0:128], groups=128)).T
    x, B, C = split(silu(c).T, [128, 512, 512])               B = ... p[.., 128:640] ..., C = ... p[.., 640:1152] ...

    before (Qwen3-Next: q, k, v cut per key-head group from in_proj_qkvz, joined for the conv)
    c = cat([q, k, v]); x = silu(conv1d(c.T, w, groups=8192)).T; q2, k2, v2 = split(x, [2048, 2048, 4096])
    after
    q2 = silu(conv1d(q.T, w[0:2048], groups=2048)).T; k2 = ... k ... w[2048:4096] ...; v2 = ... v ...

Why: x is sharded by heads and B, C by groups of heads (or kept whole); one tensor holding all three
has no Shard. Once the cut is at the projection, unfuse_projections makes three projections of it.
Qwen3-Next's q, k and v are each sharded by key-head groups, but their cat, 16 + 16 + 32 heads, is no
Shard either: split per piece, each keeps its own.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from fxtp.node_meta import replay
from fxtp.sharding.op_rules.cut_and_join import piece_bounds
from fxtp.sharding.op_rules.helpers import is_tensor_node, norm_dim, val
from fxtp.sharding.op_rules.views import PERMUTES, permutation
from fxtp.passes.capture.unfuse_projections import block_placeholder, erase_orphans
from fxtp.passes.sharding.projections import projection_site
from fxtp.passes.sharding.propagate import is_state

aten = torch.ops.aten
_CUTS = (aten.split.Tensor, aten.split_with_sizes.default)
_CONVS = (aten.conv1d.default, aten.conv2d.default)
_PER_CHANNEL = (aten.add.Tensor, aten.mul.Tensor)  # elementwise ops whose operand per channel is sliced per piece
_OTHER_DIM_VIEWS = (aten.squeeze.dim, aten.unsqueeze.default)


def split_channel_chains(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> fx.GraphModule:
    cut_into_blocks: list[fx.Node] = []
    for cut in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CUTS]:
        chain = _chain(cut)
        if chain is not None:
            cut_into_blocks += _split(gm, state, cut, *chain)
    erase_orphans(gm, cut_into_blocks)
    return gm


def _chain(cut: fx.Node) -> Optional[tuple[fx.Node, int, list[tuple[fx.Node, int]], list[tuple[int, int]]]]:
    """(start, its channel dim, [(chain node, channel dim of its input)] in graph order, the pieces'
    channel bounds) for a cut along channels whose input comes from a start through one depthwise conv
    and per-channel ops: a projection, or a cat of the very pieces the cut makes (`_joins_pieces`)."""
    node = cut.args[0]
    dim = norm_dim(cut.args[2] if len(cut.args) > 2 else 0, val(node).dim())
    bounds = piece_bounds(cut, dim)
    if bounds is None or any(u.target is not operator.getitem for u in cut.users):
        return None
    chain = []
    while projection_site(node) is None and not _joins_pieces(node, dim, bounds):
        if node.op != "call_function" or _reader(node) is None or not is_tensor_node(node.args[0]):
            return None
        src = node.args[0]
        if _round_trip(node):  # unfuse_projections' hint of head size: the replay goes without it
            node = src.args[0]
            continue
        if node.target in PERMUTES:
            dim_in = permutation(node)[dim]
        elif node.target in _CONVS:
            weight = val(node.args[1])
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            if dim != 1 or groups != weight.shape[0] or weight.shape[1] != 1 or groups != val(src).shape[1]:
                return None
            dim_in = 1
        elif val(node).dim() == val(src).dim() and val(node).shape[dim] == val(src).shape[dim] and \
                _others_broadcast(node, src, dim):
            dim_in = dim
        else:
            return None
        chain.append((node, dim_in))
        node, dim = src, dim_in
    if not any(n.target in _CONVS for n, _ in chain) or _reader(node) is None:
        return None
    return node, dim, chain[::-1], bounds


def _joins_pieces(node: fx.Node, dim: int, bounds: list[tuple[int, int]]) -> bool:
    """Whether `node` is a cat along `dim` of pieces with exactly `bounds`."""
    if node.target is not aten.cat.default or norm_dim(node.args[1] if len(node.args) > 1 else 0, val(node).dim()) != dim:
        return False
    sizes = [val(piece).shape[dim] for piece in node.args[0]]
    return all(isinstance(size, int) for size in sizes) and \
        [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))] == bounds


def _reader(node: fx.Node) -> Optional[fx.Node]:
    """The one node reading `node`'s values (dtype checks aside), or None."""
    readers = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
    return readers[0] if len(readers) == 1 else None


def _round_trip(node: fx.Node) -> bool:
    """flatten(unflatten(x)) back to x's shape."""
    src = node.args[0]
    return node.target is aten.flatten.using_ints and src.op == "call_function" and \
        src.target is aten.unflatten.int and _reader(src) is node and val(src.args[0]).shape == val(node).shape


def _others_broadcast(node: fx.Node, src: fx.Node, dim: int) -> bool:
    """Whether every operand of `node` but `src` is size 1 (or absent) along `dim` of the output, or one
    value per channel there where `node` is in _PER_CHANNEL (sliced per piece by `_split`)."""
    if node.target is aten.slice.Tensor:
        return norm_dim(node.args[1], val(src).dim()) != dim
    for other in node.all_input_nodes:
        if other is src or not is_tensor_node(other):
            continue
        along = _aligned_dim(node, other, dim)
        if along is not None and val(other).shape[along] != 1 and \
                not (node.target in _PER_CHANNEL and val(other).shape[along] == val(node).shape[dim]):
            return False
    return True


def _aligned_dim(node: fx.Node, operand: fx.Node, dim: int) -> Optional[int]:
    """The dim of `operand` that broadcasting lines up with dim `dim` of `node`'s output; None if it has none."""
    d = dim - (val(node).dim() - val(operand).dim())
    return d if d >= 0 else None


def _split(gm: fx.GraphModule, state: dict, cut: fx.Node, start_node: fx.Node, dim: int, chain: list,
           bounds: list[tuple[int, int]]) -> list[fx.Node]:
    """Replays the chain per piece; returns the state whose blocks the replayed convs read."""
    graph, fake_mode = gm.graph, detect_fake_mode([val(start_node)])
    sources = []
    pieces = []
    for i, (start, end) in enumerate(bounds):
        with graph.inserting_before(cut):
            value = start_node.args[0][i] if start_node.target is aten.cat.default else \
                replay(graph, fake_mode, chain[0][0], aten.slice.Tensor, (start_node, dim, start, end), {})
            for node, dim_in in chain:
                args, kwargs = (value, *node.args[1:]), dict(node.kwargs)
                if node.target in _PER_CHANNEL:
                    args = (value, *(_per_channel_slice(graph, fake_mode, node, a, dim_in, start, end) for a in args[1:]))
                if node.target in _CONVS:
                    args = list(args) + [1] * (7 - len(args))
                    for operand in (1, 2):  # the conv's weight and bias
                        if isinstance(args[operand], fx.Node):
                            args[operand], source = _channels(graph, state, fake_mode, node, args[operand], start, end)
                            sources += [source] if source is not None else []
                    args[6] = end - start
                value = replay(graph, fake_mode, node, node.target, tuple(args), kwargs)
        pieces.append(value)
    for user in list(cut.users):
        user.replace_all_uses_with(pieces[user.args[1]])
    for node, _ in chain:  # the dtype checks of the old chain would keep it alive
        for user in [u for u in node.users if u.target is aten._assert_tensor_metadata.default]:
            graph.erase_node(user)
    return sources


def _channels(graph: fx.Graph, state: dict, fake_mode, conv: fx.Node, operand: fx.Node, start: int,
              end: int) -> tuple[fx.Node, Optional[fx.Node]]:
    """Channels start:end (dim 0) of a conv's weight or bias, and the state they are a block of: where it is
    state read through squeezes and unsqueezes of other dims (transformers' W.squeeze(1).unsqueeze(1)), those
    views replayed on a block of that state; else a slice of it (and None)."""
    views, source = [], operand
    while source.op == "call_function" and source.target in _OTHER_DIM_VIEWS and \
            norm_dim(source.args[1], val(source if source.target is aten.unsqueeze.default else source.args[0]).dim()) > 0:
        views.insert(0, source)
        source = source.args[0]
    if not is_state(source):
        return replay(graph, fake_mode, conv, aten.slice.Tensor, (operand, 0, start, end), {}), None
    value = block_placeholder(graph, state, source, 0, start, end)
    for view in views:
        value = replay(graph, fake_mode, view, view.target, (value, *view.args[1:]), dict(view.kwargs))
    return value, source


def _per_channel_slice(graph: fx.Graph, fake_mode, node: fx.Node, operand, dim: int, start: int, end: int):
    """An operand of `node` (an op on the channels `dim` of its first input) as the piece start:end needs
    it: its slice where it holds a value per channel, else itself."""
    if not is_tensor_node(operand):
        return operand
    along = _aligned_dim(node, operand, dim)
    if along is None or val(operand).shape[along] == 1:
        return operand
    return replay(graph, fake_mode, node, aten.slice.Tensor, (operand, along, start, end), {})

