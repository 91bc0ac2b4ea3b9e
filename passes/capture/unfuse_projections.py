"""Unfuse projections whose output features are cut into unequal pieces: one projection per piece.

Reads:  projections (passes/sharding/projections.py: linear(x, W[out, in]), mm(x, W[in, out]),
        matmul(x, W.T)) with a state weight, node.meta["val"], node.meta["fxtp.state"], and the
        values of constant index tensors in `state`.
Writes: for each unfused projection, per piece: a new state placeholder for the weight's block
        (and of each per-feature state it is added to or scaled by: a bias, Falcon-H1's µP
        multipliers), named `state_names.derived_name` ("W[64:96]" rows of a [out, in]
        weight, "W[:, 64:96]" columns of a [in, out] one), its tensor in `state` (a view of
        the source tensor, real or meta), and the projection, bias add, scaling and reshapes replayed on
        it with node.meta["val"] and the origin keys (fxtp.node_meta.ORIGIN) of the nodes they replace.
        The fused nodes and the state placeholders left without users are removed; `state`
        keeps the source tensors (checkpoint loading checks their shapes).

    before (Phi-3, GQA)                         after
    p = linear(x, W[128, 64])                   q = linear(x, W[0:64]);   k = linear(x, W[64:96])
    q = p[..., 0:64]; k = p[..., 64:96]         v = linear(x, W[96:128])
    v = p[..., 96:]

    before (Falcon-7B, multi-query)             after
    p = matmul(x, W.T); h = view(p, [b, s, 6, 16])          q = view(matmul(x, W[0:64].T), [b, s, 4, 16])
    q = h[:, :, :-2]; k = h[:, :, [-2]]; v = h[:, :, [-1]]   k = view(matmul(x, W[64:80].T), [b, s, 1, 16]) ...

Why: a Shard cannot hold "q sharded by heads, the one kv head replicated" in one tensor; as
separate projections the planner shards q and keeps k/v replicated (or shards them) exactly as
for a model with unfused q/k/v. The cuts recognized, along the features (after optional bias
adds and scalings by per-feature state, unsqueezes of other dims and one reshape that splits the features into [heads, head_dim]):
slice, split, split_with_sizes, chunk, and index.Tensor with a constant index tensor of
consecutive values. Every use of the output must be such a cut and the pieces must not all have
the same size: equal pieces (GPT-2's q|k|v, gate|up) are planned as fused blocks instead.
An unsqueeze is replayed as unflatten(x, d, [1, -1]), a reshape the planner follows.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxtp.node_meta import STATE, copy_origin
from fxtp.capture.state_names import derived_name
from fxtp.sharding.op_rules.cut_and_join import PIECES, piece_bounds
from fxtp.sharding.op_rules.helpers import norm_dim, val
from fxtp.sharding.op_rules.views import permutation
from fxtp.passes.node_match import only_user
from fxtp.passes.sharding.feature_units import structure_along
from fxtp.passes.sharding.projections import projection_site
from fxtp.sharding.reshape import dim_groups

aten = torch.ops.aten
_CONSTANT_COPIES = (aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default)
_PER_FEATURE = (aten.add.Tensor, aten.mul.Tensor)  # a bias, a scaling by per-feature state


@dataclass
class _Step:
    """A node between the projection and its cuts, with the dim that holds its features and
    how many features one index of that dim is (head_dim after the head-splitting reshape)."""
    node: fx.Node
    dim: int
    unit: int


@dataclass
class _Piece:
    output: fx.Node  # the node whose uses the piece's own projection takes over
    start: int       # in indices of the cut dim
    end: int
    head: int = 1    # > 1: its features are heads of this size, which nothing downstream shows


def unfuse_projections(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> fx.GraphModule:
    orphans: list[fx.Node] = []
    for proj in [n for n in gm.graph.nodes if projection_site(n) is not None]:
        found = _cuts(proj, state)
        if found is not None:
            orphans += _unfuse(gm, state, proj, *found)
    erase_orphans(gm, orphans)
    return gm


def erase_orphans(gm: fx.GraphModule, orphans: list[fx.Node]) -> None:
    """Dead code elimination, then `orphans` (the whole state placeholders, and their copies, that
    blocks replaced) erased where nothing reads them any more; the graph linted and recompiled."""
    gm.graph.eliminate_dead_code()
    alive = set(gm.graph.nodes)  # dead code elimination may have erased the pure copies already
    for node in dict.fromkeys(orphans):  # in order, once: a constant's copies before the constant
        if node in alive and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _cuts(proj: fx.Node, state: dict) -> Optional[tuple[list[_Step], list[_Piece]]]:
    """The steps from `proj` to the node its cuts read, and the pieces, when `proj` qualifies."""
    site = projection_site(proj)
    if val(site.weight).dim() != 2 or site.groups > 1:
        return None  # MoE experts (a grouped or batched GEMM), a grouped linear: its experts or groups are not pieces
    steps = [_Step(proj, val(proj).dim() - 1, 1)]
    while (user := only_user(steps[-1].node)) is not None and user.target in _PER_FEATURE \
            and user.args[0] is steps[-1].node and _is_per_feature(user.args[1], proj):
        steps.append(_Step(user, steps[-1].dim, 1))
    while (nxt := _carried(steps[-1])) is not None:
        steps.append(nxt)
    last = steps[-1]
    pieces = []
    for user in last.node.users:
        found = _pieces(user, last.dim, state)
        if found is None:
            return None
        pieces += found
    if len({p.end - p.start for p in pieces}) < 2:
        return None
    if last.unit == 1:
        _mark_heads(pieces, last.dim)
    return steps, pieces


def _mark_heads(pieces: list[_Piece], dim: int) -> None:
    """GPT-BigCode's single kv head is used as [b, 1, s, head_dim] without a reshape that splits
    its features, so the planner would see 16 units of one element; when the other pieces all
    split into heads of one size that divides it, the piece is marked as heads of that size; not
    one whose features each scale a vector (Mamba-2's dt: one value per head of x)."""
    units = {p.output: structure_along(p.output, dim)[1] for p in pieces}
    heads = {u for u in units.values() if u > 1}
    if len(heads) != 1:
        return
    head = heads.pop()
    for piece in pieces:
        if units[piece.output] == 1 and (piece.end - piece.start) % head == 0 \
                and not _scales_vectors(piece.output, dim):
            piece.head = head


def _scales_vectors(node: fx.Node, dim: int) -> bool:
    """Whether the features on `dim` of `node`, through ops that keep them there (cuts of the sequence
    among them), are unsqueezed after that dim and broadcast there by a product: each scales a vector."""
    shape = val(node).shape
    frontier, seen = [node], {node}
    while frontier:
        for user in frontier.pop().users:
            out = val(user)
            if user in seen:
                continue
            seen.add(user)
            if isinstance(out, (tuple, list)):
                frontier.append(user)  # its pieces are checked as the values they are
            elif not isinstance(out, torch.Tensor):
                continue
            elif user.target is aten.unsqueeze.default and norm_dim(user.args[1], out.dim()) > dim:
                if any(u.target is aten.mul.Tensor and val(u).shape[dim + 1] != 1 for u in user.users):
                    return True
            elif out.dim() == len(shape) and statically_known_true(out.shape[dim] == shape[dim]):
                frontier.append(user)
    return False


def _is_per_feature(node, proj: fx.Node) -> bool:
    """Whether `node` is state with one value per output feature of `proj`, broadcast along its other dims:
    a bias [F], Falcon-H1's µP multipliers [1, 1, F]."""
    if not (isinstance(node, fx.Node) and node.op == "placeholder" and STATE in node.meta):
        return False
    shape = tuple(val(node).shape)
    return len(shape) <= val(proj).dim() and shape[-1] == val(proj).shape[-1] and all(s == 1 for s in shape[:-1])


def _carried(step: _Step) -> Optional[_Step]:
    """The next step when the only user of `step.node` keeps the features whole: an unsqueeze
    of another dim, or the first reshape that splits the features into [n, unit]."""
    user = only_user(step.node)
    if user is None or user.op != "call_function":
        return None
    if user.target is aten.unsqueeze.default:
        d = norm_dim(user.args[1], val(user).dim())
        # only before the features: replayed as unflatten of dim d, which must exist and not be them
        return _Step(user, step.dim + 1, step.unit) if d < step.dim else None
    if user.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and step.unit == 1:
        for gi, gj in dim_groups(val(step.node).shape, val(user).shape) or ():
            shape = user.args[1]
            if gi == (step.dim,) and len(gj) == 2 and isinstance(shape[gj[0]], int) and isinstance(shape[gj[1]], int):
                return _Step(user, gj[0], int(val(user).shape[gj[1]]))
    return None


def _pieces(cut: fx.Node, dim: int, state: dict) -> Optional[list[_Piece]]:
    """The pieces `cut` takes along `dim`, or None when it is not a cut there."""
    if cut.op != "call_function":
        return None
    if cut.target in PIECES:
        bounds = piece_bounds(cut, dim)
        if bounds is None:
            return None
        if cut.target is aten.slice.Tensor:
            return [_Piece(cut, *bounds[0])]
        if any(u.target is not operator.getitem for u in cut.users):
            return None
        return [_Piece(u, *bounds[u.args[1]]) for u in cut.users]
    if cut.target is aten.index.Tensor:
        indices = cut.args[1]
        if len(indices) != dim + 1 or any(i is not None for i in indices[:dim]):
            return None
        constant = _lifted_constant(indices[dim])
        values = state.get(constant.meta[STATE]) if constant is not None else None
        if values is None or isinstance(values, torch.nn.Parameter) or values.is_meta \
                or values.is_floating_point() or values.dim() != 1 or values.numel() == 0:
            return None
        size = int(val(cut.args[0]).shape[dim])
        rows = [v % size for v in values.tolist()]
        if rows != list(range(rows[0], rows[0] + len(rows))):
            return None
        return [_Piece(cut, rows[0], rows[0] + len(rows))]
    return None


def _lifted_constant(node) -> Optional[fx.Node]:
    """The state placeholder of an index tensor export lifted as a constant (Falcon's [-2]),
    read directly or through lift_fresh_copy and detach_ (a tensor made while tracing)."""
    last = _constant_chain(node)[-1]
    return last if isinstance(last, fx.Node) and last.op == "placeholder" and STATE in last.meta else None


def _constant_chain(node) -> list:
    """`node` and the copies it reads back to their source (the placeholder of a constant)."""
    chain = [node]
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONSTANT_COPIES:
        node = node.args[0]
        chain.append(node)
    return chain


def _unfuse(gm: fx.GraphModule, state: dict, proj: fx.Node, steps: list[_Step], pieces: list[_Piece]) -> list[fx.Node]:
    """Replay `steps` once per piece on the piece's block of the weight (and of its per-feature state);
    returns the state placeholders the fused nodes read (and the copies of index constants, users first),
    to drop once nothing uses them."""
    graph = gm.graph
    site = projection_site(proj)
    weight, out_dim = site.weight, site.weight_out
    permutes = []  # the transposes between the weight and the projection (Falcon's W.T)
    node = proj.args[1]
    while node is not weight:
        permutes.insert(0, node)
        node = node.args[0]
    per_feature = [step.node for step in steps[1:] if step.node.target in _PER_FEATURE]  # right after proj
    for piece in pieces:
        lo, hi = piece.start * steps[-1].unit, piece.end * steps[-1].unit
        new_weight = block_placeholder(graph, state, weight, out_dim, lo, hi)
        blocks = {n: block_placeholder(graph, state, n.args[1], val(n.args[1]).dim() - 1, lo, hi) for n in per_feature}
        with graph.inserting_before(piece.output):
            w, w_dim = new_weight, out_dim
            for permute in permutes:
                w_dim = permutation(permute).index(w_dim)
                w = _copy(graph, permute, (w, *permute.args[1:]), _resized(val(permute), w_dim, hi - lo))
            x = None
            for step in steps:
                size = (hi - lo) // step.unit
                if step.node is proj:
                    args = (proj.args[0], w, *proj.args[2:])
                elif step.node in blocks:
                    args = (x, blocks[step.node])
                elif step.node.target is aten.unsqueeze.default:
                    d = norm_dim(step.node.args[1], val(step.node).dim())
                    x = _copy(graph, step.node, (x, d, [1, -1]), _resized(val(step.node), step.dim, size),
                              target=aten.unflatten.int)
                    continue
                else:  # the head-splitting reshape: n heads become this piece's
                    shape = list(step.node.args[1])
                    shape[step.dim] = shape[step.dim] if shape[step.dim] == -1 else size
                    args = (x, shape)
                x = _copy(graph, step.node, args, _resized(val(step.node), step.dim, size))
                if piece.head > 1 and step is steps[len(per_feature)]:
                    x = _as_heads(graph, step.node, x, piece.head)
        piece.output.replace_all_uses_with(x)
        x.meta["val"] = val(piece.output)
    constants = [n for p in pieces if p.output.target is aten.index.Tensor for n in _constant_chain(p.output.args[1][-1])]
    return [weight] + [n.args[1] for n in per_feature] + constants


def block_placeholder(graph: fx.Graph, state: dict, source: fx.Node, dim: int, lo: int, hi: int) -> fx.Node:
    """A state placeholder for the block lo:hi along `dim` of the state `source`, named by `derived_name`, its
    tensor (a view of the source's) added to `state`; placed before the graph's inputs, as state is."""
    name = derived_name(source.meta[STATE], dim, lo, hi)
    first_input = next(n for n in graph.nodes if n.op == "placeholder" and STATE not in n.meta)
    with graph.inserting_before(first_input):
        node = graph.placeholder(f"{source.name}_{lo}_{hi}")
    node.meta[STATE] = name
    node.meta["val"] = _resized(val(source), dim, hi - lo)
    copy_origin(source, node)
    full = state[source.meta[STATE]]
    block = full.narrow(dim, lo, hi - lo)
    state[name] = torch.nn.Parameter(block, requires_grad=False) if isinstance(full, torch.nn.Parameter) else block
    return node


def _copy(graph: fx.Graph, like: fx.Node, args: tuple, value, target=None) -> fx.Node:
    """`like` on new args, or another op `target` (no kwargs) standing for it."""
    node = graph.call_function(target or like.target, args, dict(like.kwargs) if target is None else {})
    node.meta["val"] = value
    copy_origin(like, node)
    return node


def _as_heads(graph: fx.Graph, like: fx.Node, x: fx.Node, head: int) -> fx.Node:
    """x split into heads of `head` features and flattened back: the identity, but the split is
    the reshape from which the planner reads the unit of the features."""
    features = val(x).shape[-1]
    heads = _copy(graph, like, (x, -1, [features // head, head]),
                  val(x).new_empty((*val(x).shape[:-1], features // head, head)), target=aten.unflatten.int)
    return _copy(graph, like, (heads, -2, -1), val(x), target=aten.flatten.using_ints)


def _resized(value: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """An empty tensor like `value` (fake or meta, symbolic sizes kept) with `size` on `dim`."""
    return value.new_empty((*value.shape[:dim], size, *value.shape[dim + 1:]))
