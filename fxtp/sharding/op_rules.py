"""Layout propagation rules, one table keyed by ATen overload.

A rule sees a node and the layouts of its inputs and returns a `Decision`: the output layout
and, for inputs whose layout must change first, the layout it needs (`wants`). The propagate
pass turns a want into a redistribution: R->S is a free local slice, P->R an all_reduce,
S->R an all_gather. A rule may also have a `localize` that rewrites the node's constant
arguments for one rank (a head count in a view becomes the rank's local head count), or a
`lower` that computes the node with another function on each rank (a vocab-sharded embedding
masks the ids its rows do not hold).

Ops without a rule fall back to `replicate_all`: every input is made Replicate first, which
is always correct, and the dump reports it.
"""
from __future__ import annotations

import operator
from math import prod
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Layout, Partial, Replicate, Shard, same_placement
from fxtp.sharding.reshape import reshape_shard
from fxtp.rank_ops.vocab_parallel import local_padding_idx, vocab_parallel_embedding

aten = torch.ops.aten
R = Replicate()
P = Partial()

LayoutOf = Callable[[fx.Node], Optional[Layout]]


@dataclass
class Decision:
    out: object  # a Layout, a tuple of them (multi-output ops), or None (no tensor output)
    wants: dict[fx.Node, Layout] = field(default_factory=dict)
    note: str = ""  # why inputs were replicated, for the dump
    reduce_now: bool = False  # all_reduce a Partial output right after the node, for all its users


@dataclass(frozen=True)
class OpRule:
    propagate: Callable[[fx.Node, LayoutOf], Decision]
    # (node, args, kwargs, out_layout, rank) -> (args, kwargs) with per-rank constants
    localize: Optional[Callable] = None
    # (node, args, kwargs, input_layout, rank) -> (target, args, kwargs) where a rank computes the
    # node with another function (input_layout(n): the layout in which the node reads input n)
    lower: Optional[Callable] = None


# ---------------------------------------------------------------------------- helpers

def val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def is_tensor_node(n) -> bool:
    return isinstance(n, fx.Node) and isinstance(val(n), torch.Tensor)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if is_tensor_node(n)]


def ndim(n) -> int:
    return val(n).dim()


def norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def out_count(node: fx.Node) -> int:
    v = val(node)
    return len(v) if isinstance(v, (tuple, list)) else 1


def replicate_all(node: fx.Node, lay: LayoutOf, note: str = "") -> Decision:
    """Correct for any op: compute it on full inputs on every rank."""
    wants = {n: R for n in tensor_inputs(node) if not isinstance(lay(n), Replicate)}
    v = val(node)
    out = tuple(R for _ in v) if isinstance(v, (tuple, list)) else (R if isinstance(v, torch.Tensor) else None)
    if wants and not note:
        note = f"no rule for {node.target} on sharded inputs"
    return Decision(out, wants, note)


def shard_of(n, lay) -> Optional[Shard]:
    layout = lay(n) if isinstance(n, fx.Node) else None
    return layout if isinstance(layout, Shard) else None


def no_output(node, lay) -> Decision:
    return Decision(None)


def fresh(node, lay) -> Decision:
    """Factories (arange, zeros, new_ones): the same full tensor on every rank."""
    return Decision(R if isinstance(val(node), torch.Tensor) else None)


# ---------------------------------------------------------------------------- pointwise

def _broadcast_target(node: fx.Node, lay: LayoutOf, inputs: list[fx.Node]) -> tuple[Optional[Shard], dict, str]:
    """The output Shard of a broadcasting op, and the slices its replicated inputs need."""
    out_nd = ndim(node)
    target: Optional[Shard] = None
    for n in inputs:
        s = shard_of(n, lay)
        if s is None:
            continue
        mapped = s.with_dim(s.dim + out_nd - ndim(n))
        if target is None:
            target = mapped
        elif not same_placement(target, mapped):
            return None, {m: R for m in inputs if not isinstance(lay(m), Replicate)}, "inputs sharded differently"
    wants = {}
    if target is not None:
        for n in inputs:
            d = target.dim - (out_nd - ndim(n))
            if isinstance(lay(n), Shard):
                continue
            if d >= 0 and val(n).shape[d] != 1:
                wants[n] = target.with_dim(d)
    return target, wants, ""


def pointwise(linear: str = "none"):
    """Elementwise ops with broadcasting. `linear` says which Partial inputs pass through:
    'unary' (neg: f(sum) = sum f), 'sum' (add/sub: every tensor input Partial, no scalar
    added), 'scale' (mul/div: one Partial input times Replicate values), 'zero_fill'
    (masked_fill(P, mask, 0): every summand is zeroed where the sum is)."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        inputs = tensor_inputs(node)
        target, wants, note = _broadcast_target(node, lay, inputs)
        if note:
            return Decision(R, wants, note)
        partials = [n for n in inputs if isinstance(lay(n), Partial)]
        if target is not None:
            for n in partials:  # sliced above if it has the sharded dim; broadcast along it, it needs the sum
                wants.setdefault(n, R)
            return Decision(target, wants)
        if not partials:
            return Decision(R)
        if partials_pass(node, inputs, partials, linear):
            return Decision(P)
        return Decision(R, {n: R for n in partials}, f"{node.target} of a Partial and replicated values needs the sum")

    return rule


def partials_pass(node, inputs, partials, linear) -> bool:
    if linear == "unary":
        return True
    if linear == "sum":
        scalars = [a for a in node.args if not isinstance(a, fx.Node)]
        alpha = node.kwargs.get("alpha", 1)
        return len(partials) == len(inputs) and not scalars and isinstance(alpha, (int, float))
    if linear == "scale":
        # mul(P, R) or div(P, R): exactly one summand-carrying input, in the numerator for div
        if len(partials) != 1:
            return False
        return node.target not in (aten.div.Tensor,) or node.args[0] is partials[0]
    if linear == "zero_fill":
        return partials == [node.args[0]] and node.args[2] == 0
    return False


def cast(node: fx.Node, lay: LayoutOf) -> Decision:
    """to/type_as/_to_copy: layout of the first input; a Partial only if the dtype is kept."""
    src = node.args[0]
    layout = lay(src)
    if isinstance(layout, Partial) and val(src).dtype != val(node).dtype:
        return Decision(R, {src: R}, "cast of a Partial changes rounding")
    others = {n: R for n in tensor_inputs(node)[1:] if not isinstance(lay(n), Replicate)}
    return Decision(layout, others)


# ---------------------------------------------------------------------------- views

def reshape(node: fx.Node, lay: LayoutOf) -> Decision:
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: follow the sharded dim through the
    groups of dims whose products match; fails (replicate) if the owned part is not one dim."""
    src = node.args[0]
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout)
    out = reshape_shard(layout, val(src).shape, val(node).shape)
    if out is None:
        return Decision(R, {src: R}, f"reshape {list(val(src).shape)} -> {list(val(node).shape)} splits a shard")
    return Decision(out)


def localize_shape_list(arg_index: int, first_dim: Callable = lambda node: 0):
    """Replace the size of the sharded output dim in a size-list argument with the local size.
    A symbolic size (Bloom's batch*heads, a node of the rank graph) becomes
    size // units * counts[rank], computed in the rank graph."""

    def localize(node, args, kwargs, out, rank):
        if not isinstance(out, Shard):
            return args, kwargs
        sizes = list(args[arg_index])
        k = out.dim - first_dim(node)
        if 0 <= k < len(sizes) and isinstance(sizes[k], int) and sizes[k] != -1:
            sizes[k] = out.local_size(rank)
        elif 0 <= k < len(sizes) and isinstance(sizes[k], fx.Node):
            graph = sizes[k].graph
            per_unit = graph.call_function(operator.floordiv, (sizes[k], out.units))
            sizes[k] = graph.call_function(operator.mul, (per_unit, out.counts[rank]))
        return args[:arg_index] + (sizes,) + args[arg_index + 1:], kwargs

    return localize


def expand(node: fx.Node, lay: LayoutOf) -> Decision:
    src = node.args[0]
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout)
    out = layout.with_dim(layout.dim + ndim(node) - ndim(src))
    if val(node).shape[out.dim] != val(src).shape[layout.dim]:
        return Decision(R, {src: R}, "expand broadcasts a sharded dim")
    return Decision(out)


def permutation(node: fx.Node) -> list[int]:
    """perm[i] = the input dim that becomes output dim i."""
    nd = ndim(node.args[0])
    if node.target in (aten.transpose.int,):
        a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if node.target in (aten.permute.default,):
        return [norm_dim(d, nd) for d in node.args[1]]
    return list(reversed(range(nd)))  # t, numpy_T


def permute(node: fx.Node, lay: LayoutOf) -> Decision:
    layout = lay(node.args[0])
    if not isinstance(layout, Shard):
        return Decision(layout)
    return Decision(layout.with_dim(permutation(node).index(layout.dim)))


def along_dim(dim_arg: int = 1, removes_dim: bool = False, tuple_out: bool = False, keeps_partial: bool = True,
              default_dim: Optional[int] = 0):
    """Ops acting along one dim (slice, select, split, softmax, cumsum, topk, index_select):
    fine while that dim is not the sharded one. `default_dim` is the schema's default, which
    export leaves out (split(x, 2) splits dim 0); None flattens (repeat_interleave without dim)."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        src = node.args[0]
        layout = lay(src)
        dim = node.args[dim_arg] if len(node.args) > dim_arg else node.kwargs.get("dim", default_dim)
        dim = None if dim is None else norm_dim(dim, ndim(src))
        others = {n: R for n in tensor_inputs(node) if n is not src and not isinstance(lay(n), Replicate)}
        if isinstance(layout, Partial) and not keeps_partial:
            return _along_out(node, R, tuple_out, {src: R, **others}, f"{node.target} of a Partial")
        if isinstance(layout, Shard):
            if dim is None or layout.dim == dim:
                return _along_out(node, R, tuple_out, {src: R, **others}, f"{node.target} along the sharded dim")
            if removes_dim and layout.dim > dim:
                layout = layout.with_dim(layout.dim - 1)
        return _along_out(node, layout, tuple_out, others)

    return rule


def _along_out(node, layout, tuple_out, wants, note=""):
    out = tuple(layout for _ in range(out_count(node))) if tuple_out else layout
    return Decision(out, wants, note)


# ops that cut a dim into pieces: (dim argument index, default dim)
PIECES = {aten.split.Tensor: 2, aten.split_with_sizes.default: 2, aten.chunk.default: 2, aten.slice.Tensor: 1}


def piece_bounds(node: fx.Node, dim: Optional[int] = None) -> Optional[list[tuple[int, int]]]:
    """[(start, end)] of the pieces `node` cuts along its dim (only if that is `dim`, when given)."""
    src = node.args[0]
    cut = norm_dim(node.args[PIECES[node.target]] if len(node.args) > PIECES[node.target] else 0, ndim(src))
    size = val(src).shape[cut]
    if (dim is not None and cut != dim) or not isinstance(size, int):
        return None
    if node.target is aten.slice.Tensor:
        start, end = (list(node.args[2:4]) + [0, size][len(node.args[2:4]):])
        start, end = (0 if start is None else start), (size if end is None else end)
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1 or not isinstance(start, int) or not isinstance(end, int):
            return None
        return [tuple(min(max(b + size if b < 0 else b, 0), size) for b in (start, end))]
    if node.target is aten.split_with_sizes.default:
        lengths = list(node.args[1])
    else:
        length = node.args[1] if node.target is aten.split.Tensor else -(-size // node.args[1])
        lengths = [min(length, size - b) for b in range(0, size, length)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(b, b + n) for b, n in zip(starts, lengths)]


def cut_blocks(node: fx.Node, lay: LayoutOf) -> Decision:
    """split/chunk/slice: along a sharded dim each piece must be whole fused blocks (GPT-2's
    c_attn split into q, k, v: every rank holds its heads of each); elsewhere as along_dim."""
    layout = lay(node.args[0])
    bounds = piece_bounds(node)
    if not isinstance(layout, Shard) or bounds is None or layout.dim != norm_dim(
            node.args[PIECES[node.target]] if len(node.args) > PIECES[node.target] else 0, ndim(node.args[0])):
        return along_dim(PIECES[node.target], tuple_out=node.target is not aten.slice.Tensor)(node, lay)
    block = layout.units * layout.inner
    if any(b % block or e % block for b, e in bounds):
        return replicate_all(node, lay, f"{node.target} cuts inside a block of the sharded dim")
    pieces = tuple(Shard(layout.dim, layout.counts, layout.inner, (e - b) // block) for b, e in bounds)
    return Decision(pieces[0] if node.target is aten.slice.Tensor else pieces)


def localize_cut(node, args, kwargs, out, rank):
    """Piece sizes and slice bounds in this rank's elements, when the cut is along the sharded
    dim (then every bound is a whole number of blocks, a block being counts[rank] local units)."""
    shard = out[0] if isinstance(out, tuple) else out
    if not isinstance(shard, Shard) or piece_bounds(node, shard.dim) is None:
        return args, kwargs
    block, local = shard.units * shard.inner, shard.counts[rank] * shard.inner
    to_local = lambda b: b // block * local  # noqa: E731
    if node.target is aten.slice.Tensor:
        (start, end), = piece_bounds(node)
        return (args[0], args[1], to_local(start), to_local(end)) + tuple(args[4:]), kwargs
    if node.target is aten.split.Tensor:
        return (args[0], to_local(args[1])) + tuple(args[2:]), kwargs
    if node.target is aten.split_with_sizes.default:
        return (args[0], [to_local(n) for n in args[1]]) + tuple(args[2:]), kwargs
    return args, kwargs  # chunk: equal local pieces already


def cat(node: fx.Node, lay: LayoutOf) -> Decision:
    inputs = [n for n in node.args[0] if is_tensor_node(n)]
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    layouts = [lay(n) for n in inputs]
    if all(isinstance(x, Replicate) for x in layouts):
        return Decision(R)
    if all(isinstance(x, Partial) for x in layouts):
        return Decision(P)
    shards = [x for x in layouts if isinstance(x, Shard)]
    if shards and shards[0].dim != dim and all(isinstance(x, Shard) and same_placement(x, shards[0]) for x in layouts):
        return Decision(shards[0])
    return Decision(R, {n: R for n, x in zip(inputs, layouts) if not isinstance(x, Replicate)},
                    "cat of differently laid out inputs")


def stack(node: fx.Node, lay: LayoutOf) -> Decision:
    inputs = list(node.args[0])
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    layouts = [lay(n) for n in inputs]
    first = layouts[0]
    if all(x == first for x in layouts) and not isinstance(first, Shard):
        return Decision(first)
    if isinstance(first, Shard) and all(isinstance(x, Shard) and same_placement(x, first) for x in layouts):
        return Decision(first.with_dim(first.dim + (1 if first.dim >= dim else 0)))
    return replicate_all(node, lay, "stack of differently laid out inputs")


# ---------------------------------------------------------------------------- reductions

def reduction(kind: str):
    """sum/mean/amax over `dims`: sum over the sharded dim gives a Partial; others need it whole."""

    def rule(node: fx.Node, lay: LayoutOf) -> Decision:
        src = node.args[0]
        layout = lay(src)
        nd = ndim(src)
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(nd)) if dims is None or dims == [] else [norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(layout, Partial):
            return Decision(P) if kind == "sum" else Decision(R, {src: R}, f"{kind} of a Partial")
        if not isinstance(layout, Shard):
            return Decision(R)
        if layout.dim in dims:
            if kind in ("sum", "mean") and all(isinstance(val(src).shape[d], int) for d in dims):
                return Decision(P)  # a mean is lowered to local sum / global count (mean_as_partial)
            return Decision(R, {src: R}, f"{kind} over the sharded dim")
        shift = 0 if keepdim else sum(1 for d in dims if d < layout.dim)
        return Decision(layout.with_dim(layout.dim - shift))

    return rule


def partial_mean(x: torch.Tensor, dims: list, keepdim: bool, count: int) -> torch.Tensor:
    """This rank's summand of a mean over a sharded dim (OLMo-2's q/k norms span all heads)."""
    return torch.sum(x, dims, keepdim) / count


def mean_as_partial(node, args, kwargs, layout_of, rank):
    """mean.dim over the sharded dim: every rank divides its local sum by the global count."""
    layout = layout_of(node.args[0])
    dims = [norm_dim(d, ndim(node.args[0])) for d in node.args[1]]
    if not isinstance(layout, Shard) or layout.dim not in dims:
        return node.target, args, kwargs
    count = prod(int(val(node.args[0]).shape[d]) for d in dims)
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    return partial_mean, (args[0], args[1], keepdim, count), {}


def norm(node: fx.Node, lay: LayoutOf) -> Decision:
    """layer_norm / rms_norm(x, normalized_shape, weight, ...): normalized dims must be whole."""
    src = node.args[0]
    layout = lay(src)
    nd = ndim(src)
    normalized = len(node.args[1])
    wants = {n: R for n in tensor_inputs(node)[1:] if not isinstance(lay(n), Replicate)}
    if isinstance(layout, Partial) or (isinstance(layout, Shard) and layout.dim >= nd - normalized):
        return Decision(R, {src: R, **wants}, "normalization over the sharded dim")
    return Decision(layout, wants)


# ---------------------------------------------------------------------------- contractions

def linear(node: fx.Node, lay: LayoutOf) -> Decision:
    """linear(x, W[out, in], b[out]).
    column: x R, W S(0)          -> S(last), b sliced like W
    row:    x S(last), W R or S(1) same placement -> P (W sliced: a parameter is just stored so)
    Partial x and W replicated, no bias: P (linear in x)."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    xl, wl = lay(x), lay(w)
    nd = ndim(node)
    bias_r = {b: R} if isinstance(b, fx.Node) and not isinstance(lay(b), Replicate) else {}
    if isinstance(wl, Shard) and wl.dim == 0 and isinstance(xl, Replicate):
        wants = {b: wl} if isinstance(b, fx.Node) else {}
        return Decision(wl.with_dim(nd - 1), wants)
    if isinstance(xl, Shard) and xl.dim == ndim(x) - 1 and b is None:
        need = xl.with_dim(1)
        if isinstance(wl, Replicate) or (isinstance(wl, Shard) and same_placement(wl, need)):
            return Decision(P, {w: need} if isinstance(wl, Replicate) else {})
    if isinstance(xl, Shard) and xl.dim < ndim(x) - 1 and isinstance(wl, Replicate):
        return Decision(xl, bias_r)  # a batch-like dim is sharded: rows are independent
    if isinstance(xl, Partial) and isinstance(wl, Replicate) and b is None:
        return Decision(P)
    if isinstance(xl, Replicate) and isinstance(wl, Replicate):
        return Decision(R, bias_r)
    return replicate_all(node, lay, "linear with incompatible input and weight layouts")


def matmul(node: fx.Node, lay: LayoutOf) -> Decision:
    """a[..., n, k] @ b[..., k, m] (matmul/mm/bmm): shards of batch dims, n, m pass through;
    the contraction dim sharded on both sides gives a Partial."""
    return _product(node, lay, node.args[0], node.args[1])


def baddbmm(node: fx.Node, lay: LayoutOf) -> Decision:
    """beta * input + alpha * (a @ b) (Bloom's ALiBi scores): the product as for bmm; a
    replicated input is sliced like a sharded product (ALiBi by head), otherwise all whole."""
    src, a, b = node.args[:3]
    product = _product(node, lay, a, b)
    target, have = product.out, lay(src)
    if not isinstance(target, Shard):
        if isinstance(target, Replicate):
            return Decision(R, {**product.wants, **({} if isinstance(have, Replicate) else {src: R})}, product.note)
        return replicate_all(node, lay, "baddbmm of a Partial product")
    d = target.dim - (ndim(node) - ndim(src))
    if isinstance(have, Replicate):
        broadcast = d < 0 or val(src).shape[d] == 1
        return Decision(target, {**product.wants, **({} if broadcast else {src: target.with_dim(d)})})
    if isinstance(have, Shard) and same_placement(have, target.with_dim(d)):
        return Decision(target, product.wants)
    return replicate_all(node, lay, "baddbmm input sharded unlike the product")


def _product(node: fx.Node, lay: LayoutOf, a: fx.Node, b: fx.Node) -> Decision:
    al, bl = lay(a), lay(b)
    na, nb, no = ndim(a), ndim(b), ndim(node)
    if na < 2 or nb < 2:
        return replicate_all(node, lay, "matmul with a vector")
    if isinstance(al, Partial) and isinstance(bl, Replicate) or isinstance(al, Replicate) and isinstance(bl, Partial):
        return Decision(P)
    if isinstance(al, Replicate) and isinstance(bl, Replicate):
        return Decision(R)
    sa, sb = shard_of(a, lay), shard_of(b, lay)
    if isinstance(al, Partial) or isinstance(bl, Partial):
        return replicate_all(node, lay, "matmul of a Partial and a Shard")
    if sa is not None and sa.dim == na - 1 or sb is not None and sb.dim == nb - 2:
        need_a = sa if sa is not None and sa.dim == na - 1 else sb.with_dim(na - 1)
        need_b = sb if sb is not None and sb.dim == nb - 2 else sa.with_dim(nb - 2)
        if same_placement(need_a, sa or need_a) and same_placement(need_b, sb or need_b) and same_placement(need_a.with_dim(0), need_b.with_dim(0)):
            wants = {}
            if sa is None:
                wants[a] = need_a
            if sb is None:
                wants[b] = need_b
            if (sa is None or sa.dim == na - 1) and (sb is None or sb.dim == nb - 2):
                return Decision(P, wants)
        return replicate_all(node, lay, "matmul contraction sharded differently")
    if sa is not None and sa.dim == na - 2 and sb is None:
        return Decision(sa.with_dim(no - 2))
    if sb is not None and sb.dim == nb - 1 and sa is None:
        return Decision(sb.with_dim(no - 1))
    # batch dims: align from the right of the batch part
    target = (sa.with_dim(sa.dim + no - na) if sa is not None else sb.with_dim(sb.dim + no - nb))
    wants = {}
    for n, s, nd in ((a, sa, na), (b, sb, nb)):
        d = target.dim - (no - nd)
        if s is not None:
            if not same_placement(s, target.with_dim(s.dim)) or s.dim != d:
                return replicate_all(node, lay, "matmul batch dims sharded differently")
        elif d >= 0 and val(n).shape[d] != 1:
            wants[n] = target.with_dim(d)
    return Decision(target, wants)


# Per-expert GEMMs of MoE layers. transformers registers its fallback op only when imported, so
# it is named here (fxtp does not import transformers); see rule_for and calls.
GROUPED_MM_FALLBACK = "transformers::grouped_mm_fallback"
GROUPED_MM = (aten._grouped_mm.default, GROUPED_MM_FALLBACK)


def grouped_mm(node: fx.Node, lay: LayoutOf) -> Decision:
    """x[S, in] @ W[E, in, out] (+ b[E, out]), the rows of expert e being offs[e-1]:offs[e]
    (offs is routing: Replicate). Per expert this is a linear, so:
    column: x R, W S(2)                          -> S(1), b sliced like W
    row:    x S(1), W R or S(1) same placement   -> P (W sliced), no bias
    Partial x and W replicated, no bias          -> P (linear in x)."""
    x, w = node.args[0], node.args[1]
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    if ndim(x) != 2 or ndim(w) != 3:
        return replicate_all(node, lay, "grouped mm other than x[S, in] @ W[E, in, out]")
    xl, wl, sx = lay(x), lay(w), shard_of(x, lay)
    wants = {n: R for n in (offs, b) if isinstance(n, fx.Node) and not isinstance(lay(n), Replicate)}
    if isinstance(wl, Shard) and wl.dim == 2 and isinstance(xl, Replicate):
        return Decision(wl.with_dim(1), {**wants, b: wl.with_dim(1)} if isinstance(b, fx.Node) else wants)
    if b is None and sx is not None and sx.dim == 1:
        need = sx.with_dim(1)
        if isinstance(wl, Replicate):
            return Decision(P, {**wants, w: need})
        if isinstance(wl, Shard) and same_placement(wl, need):
            return Decision(P, wants)
    if b is None and isinstance(xl, Partial) and isinstance(wl, Replicate):
        return Decision(P, wants)
    if isinstance(xl, Replicate) and isinstance(wl, Replicate):
        return Decision(R, wants)
    return replicate_all(node, lay, "grouped mm with incompatible input and weight layouts")


def sdpa(node: fx.Node, lay: LayoutOf) -> Decision:
    """scaled_dot_product_attention(q, k, v, mask): heads (dim 1) or batch (dim 0) may be
    sharded; k, v and a per-head mask are sliced to match q. With enable_gqa, k/v hold
    q_heads/rep heads and must be sharded rep times coarser."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    inputs = [n for n in (q, k, v, mask) if isinstance(n, fx.Node)]
    if any(isinstance(lay(n), Partial) for n in inputs):
        return replicate_all(node, lay, "attention of a Partial")
    sq = shard_of(q, lay)
    if sq is None:
        if all(isinstance(lay(n), Replicate) for n in inputs):
            return Decision(R)
        return replicate_all(node, lay, "attention with q replicated but k/v sharded")
    if sq.dim not in (0, 1):
        return replicate_all(node, lay, "attention sharded along sequence or head_dim")
    wants = {}
    for n in (k, v):
        need = sq
        size = val(n).shape[sq.dim]
        if size == 1 and sq.dim == 1 and isinstance(lay(n), Replicate):
            continue  # one kv head broadcast over q's heads (multi-query attention): every rank reads it
        if size != val(q).shape[sq.dim]:
            rep = val(q).shape[sq.dim] // size
            if any(c % rep for c in sq.counts) or sq.outer != 1:
                return replicate_all(node, lay, "GQA heads do not split evenly with q")
            need = Shard(sq.dim, tuple(c // rep for c in sq.counts), sq.inner)
        s = shard_of(n, lay)
        if s is None:
            wants[n] = need
        elif not same_placement(s, need):
            return replicate_all(node, lay, "q and k/v sharded differently")
    if isinstance(mask, fx.Node):
        d = sq.dim - (ndim(q) - ndim(mask))
        s = shard_of(mask, lay)
        if d >= 0 and val(mask).shape[d] != 1:
            if s is None:
                wants[mask] = sq.with_dim(d)
            elif not same_placement(s, sq.with_dim(d)):
                return replicate_all(node, lay, "mask sharded differently from q")
        elif s is not None:
            wants[mask] = R
    return Decision(sq, wants)


def embedding(node: fx.Node, lay: LayoutOf) -> Decision:
    """embedding(W[vocab, hidden], ids): hidden-sharded W or sharded ids pass through. A
    vocab-sharded W (contiguous rows per rank) with replicated ids gives a Partial that is
    all-reduced at once: each id is non-zero on one rank only, so the sum is exact."""
    w, ids = node.args[0], node.args[1]
    wl, il = lay(w), lay(ids)
    if isinstance(wl, Replicate) and isinstance(il, Replicate):
        return Decision(R)
    if isinstance(wl, Shard) and wl.dim == 1 and isinstance(il, Replicate):
        return Decision(wl.with_dim(ndim(node) - 1))
    if isinstance(wl, Replicate) and isinstance(il, Shard):
        return Decision(il)
    if isinstance(wl, Shard) and wl.dim == 0 and wl.inner == wl.outer == 1 and isinstance(il, Replicate):
        return Decision(P, reduce_now=True)
    return replicate_all(node, lay, "embedding with both table and ids sharded, or vocab rows not contiguous")


def vocab_parallel(node, args, kwargs, input_layout, rank):
    """Lowering of an embedding whose table is vocab-sharded: the rank's masked lookup
    (fxtp.rank_ops.vocab_parallel) from its first vocab row, with the padding row made local."""
    table = input_layout(node.args[0])
    if not (isinstance(table, Shard) and table.dim == 0):
        return node.target, args, kwargs
    start, rows = table.unit_start(rank), table.counts[rank]
    weight, ids, *rest = args
    if rest:
        rest[0] = local_padding_idx(rest[0], start, rows)
    elif "padding_idx" in kwargs:
        kwargs = {**kwargs, "padding_idx": local_padding_idx(kwargs["padding_idx"], start, rows)}
    return vocab_parallel_embedding, (weight, ids, start, *rest), kwargs


def index(node: fx.Node, lay: LayoutOf) -> Decision:
    """x[i0, i1, ...] (aten.index.Tensor) with replicated integer indices: a gather, so a Partial
    stays Partial (rows of a sum are the sums of rows) and a shard of a dim that is not indexed
    moves to where that dim lands (indexed dims adjacent; numpy moves scattered ones first)."""
    src, indices = node.args[0], node.args[1]
    wants = {i: R for i in indices if isinstance(i, fx.Node) and not isinstance(lay(i), Replicate)}
    layout = lay(src)
    if not isinstance(layout, Shard):
        return Decision(layout, wants)
    given = [k for k, i in enumerate(indices) if i is not None]
    if layout.dim in given or given != list(range(given[0], given[-1] + 1)) or \
            any(val(indices[k]).dtype in (torch.bool, torch.uint8) for k in given):
        return Decision(R, {src: R, **wants}, "index along or around the sharded dim")
    shift = 0 if layout.dim < given[0] else ndim(node) - ndim(src)
    return Decision(layout.with_dim(layout.dim + shift), wants)


def index_copy(node: fx.Node, lay: LayoutOf) -> Decision:
    """index_copy(self, dim, index, source): `source` is written into `self` along `dim` (a KV
    cache update), so `self` takes the layout of `source` on the other dims. In place, that want
    is met only by storing `self` in that layout (state settles to it; rewrite checks)."""
    target, dim, positions, source = node.args[:4]
    wants = {positions: R} if not isinstance(lay(positions), Replicate) else {}
    s = shard_of(source, lay)
    if s is None or s.dim == norm_dim(dim, ndim(target)):
        return Decision(R, {**wants, **{n: R for n in (target, source) if not isinstance(lay(n), Replicate)}},
                        "" if s is None else "index_copy along the sharded dim")
    return Decision(s, {**wants, target: s})


def like(node: fx.Node, lay: LayoutOf) -> Decision:
    """zeros_like/empty_like/ones_like/full_like: same shape as the input; never a Partial."""
    layout = lay(node.args[0])
    return Decision(layout if isinstance(layout, Shard) else R)


def getitem(node: fx.Node, lay: LayoutOf) -> Decision:
    src, idx = node.args
    layout = lay(src)
    return Decision(layout[idx] if isinstance(layout, tuple) else None)


def sym_size(node: fx.Node, lay: LayoutOf) -> Decision:
    s = shard_of(node.args[0], lay)
    if s is not None and s.dim == norm_dim(node.args[1], ndim(node.args[0])):
        return Decision(None, {node.args[0]: R}, "size of a sharded dim")
    return Decision(None)


# ---------------------------------------------------------------------------- the table

_unary_linear = pointwise("unary")
_elementwise = pointwise("none")
_reshape_rule = OpRule(reshape, localize_shape_list(1))

RULES: dict[object, OpRule] = {
    # pointwise, linear in a Partial input
    aten.neg.default: OpRule(_unary_linear),
    aten.alias.default: OpRule(_unary_linear),
    aten.clone.default: OpRule(_unary_linear),
    aten.contiguous.default: OpRule(_unary_linear),
    aten.detach.default: OpRule(_unary_linear),
    aten.detach_.default: OpRule(_unary_linear),
    aten.lift_fresh_copy.default: OpRule(_unary_linear),
    aten.dropout.default: OpRule(_unary_linear),  # graphs are captured in eval mode: identity
    aten.add.Tensor: OpRule(pointwise("sum")),
    aten.sub.Tensor: OpRule(pointwise("sum")),
    aten.add_.Tensor: OpRule(pointwise("sum")),
    aten.mul.Tensor: OpRule(pointwise("scale")),
    aten.div.Tensor: OpRule(pointwise("scale")),
    aten.div_.Tensor: OpRule(pointwise("scale")),
    # pointwise, Partial inputs must be reduced first
    **{op: OpRule(_elementwise) for op in (
        aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
        aten.sigmoid.default, aten.rsqrt.default, aten.sqrt.default, aten.reciprocal.default,
        aten.exp.default, aten.log.default, aten.cos.default, aten.sin.default,
        aten.square.default, aten.abs.default, aten.expm1.default, aten.log1p.default, aten.erf.default,
        aten.softplus.default, aten.elu.default, aten.celu.default, aten.selu.default, aten.leaky_relu.default,
        aten.hardtanh.default, aten.relu6.default, aten.hardsigmoid.default, aten.hardswish.default,
        aten.mish.default, aten.sign.default, aten.sgn.default, aten.floor.default, aten.ceil.default,
        aten.round.default, aten.trunc.default, aten.clamp_min.default, aten.clamp_max.default,
        aten.atan.default, aten.log2.default, aten.exp2.default, aten.sinh.default, aten.cosh.default,
        aten.isnan.default, aten.isinf.default, aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor,
        aten.pow.Scalar, aten.clamp.default, aten.mul.Scalar, aten.add.Scalar,
        aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_not.default, aten.logical_not.default,
        aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.eq.Tensor, aten.ne.Tensor,
        aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
        aten.max.other, aten.min.other, aten.maximum.default, aten.minimum.default,
        aten.floor_divide.default, aten.remainder.Scalar, aten.where.self, aten.where.ScalarOther,
        aten.where.ScalarSelf, aten.masked_fill.Tensor,
    )},
    aten.masked_fill.Scalar: OpRule(pointwise("zero_fill")),  # MoE zeroes unrouted rows of a Partial
    # casts
    aten.to.dtype: OpRule(cast),
    aten.to.device: OpRule(cast),
    aten.to.dtype_layout: OpRule(cast),
    aten._to_copy.default: OpRule(cast),
    aten.type_as.default: OpRule(cast),
    # views
    aten.view.default: _reshape_rule,
    aten.reshape.default: _reshape_rule,
    aten._unsafe_view.default: _reshape_rule,
    aten.flatten.using_ints: OpRule(reshape),
    aten.unflatten.int: OpRule(reshape, localize_shape_list(2, first_dim=lambda n: norm_dim(n.args[1], ndim(n.args[0])))),
    aten.squeeze.dim: OpRule(reshape),
    aten.squeeze.dims: OpRule(reshape),
    aten.unsqueeze.default: OpRule(reshape),
    aten.expand.default: OpRule(expand, localize_shape_list(1)),
    aten.broadcast_to.default: OpRule(expand, localize_shape_list(1)),
    aten.transpose.int: OpRule(permute),
    aten.permute.default: OpRule(permute),
    aten.t.default: OpRule(permute),
    aten.numpy_T.default: OpRule(permute),
    aten.slice.Tensor: OpRule(cut_blocks, localize_cut),
    aten.select.int: OpRule(along_dim(1, removes_dim=True)),
    aten.split.Tensor: OpRule(cut_blocks, localize_cut),
    aten.split_with_sizes.default: OpRule(cut_blocks, localize_cut),
    aten.chunk.default: OpRule(cut_blocks, localize_cut),
    aten.unbind.int: OpRule(along_dim(1, removes_dim=True, tuple_out=True)),
    aten.index_select.default: OpRule(along_dim(1)),
    aten.repeat_interleave.self_int: OpRule(along_dim(2, default_dim=None)),
    aten.cat.default: OpRule(cat),
    aten.stack.default: OpRule(stack),
    # reductions and normalizations along one dim
    aten.softmax.int: OpRule(along_dim(1, keeps_partial=False)),
    aten._softmax.default: OpRule(along_dim(1, keeps_partial=False)),
    aten.log_softmax.int: OpRule(along_dim(1, keeps_partial=False)),
    aten.cumsum.default: OpRule(along_dim(1)),
    aten.topk.default: OpRule(along_dim(2, tuple_out=True, keeps_partial=False, default_dim=-1)),
    aten.sort.default: OpRule(along_dim(1, tuple_out=True, keeps_partial=False, default_dim=-1)),
    aten.sum.dim_IntList: OpRule(reduction("sum")),
    aten.mean.dim: OpRule(reduction("mean"), lower=mean_as_partial),
    aten.amax.default: OpRule(reduction("amax")),
    aten.layer_norm.default: OpRule(norm),
    aten.rms_norm.default: OpRule(norm),
    # contractions
    aten.linear.default: OpRule(linear),
    aten.matmul.default: OpRule(matmul),
    aten.mm.default: OpRule(matmul),
    aten.bmm.default: OpRule(matmul),
    aten.baddbmm.default: OpRule(baddbmm),
    **{op: OpRule(grouped_mm) for op in GROUPED_MM},  # MoE experts: column/row-parallel per expert
    aten.scaled_dot_product_attention.default: OpRule(sdpa),
    aten.embedding.default: OpRule(embedding, lower=vocab_parallel),
    aten.index.Tensor: OpRule(index),  # MoE token gathers: a Partial passes through
    aten.index_copy.default: OpRule(index_copy),
    aten.index_copy_.default: OpRule(index_copy),  # static KV cache updates
    # factories and metadata
    **{op: OpRule(fresh) for op in (
        aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
        aten.ones.default, aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default,
        aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default,
    )},
    **{op: OpRule(like) for op in (
        aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    )},
    aten._assert_tensor_metadata.default: OpRule(no_output),
    aten.sym_size.int: OpRule(sym_size),
    operator.getitem: OpRule(getitem),
}


def op_name(target) -> Optional[str]:
    """'namespace::name' of an op overload (how RULES names ops fxtp does not import), else None."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else None


def calls(node: fx.Node, ops) -> bool:
    """Whether `node` calls one of `ops`, given as overloads or by op_name."""
    return node.op == "call_function" and (node.target in ops or op_name(node.target) in ops)


def rule_for(node: fx.Node) -> OpRule:
    rule = RULES.get(node.target) or RULES.get(op_name(node.target))
    if rule is not None:
        return rule
    if not any(isinstance(val(n), torch.Tensor) for n in node.all_input_nodes) and not isinstance(val(node), torch.Tensor):
        return OpRule(no_output)  # symbolic-int arithmetic (operator.mul, sym_max, ...)
    return OpRule(replicate_all)
