"""Ops that cut a dim into pieces (split, split_with_sizes, chunk, slice) and that join pieces
(cat, stack). Along a sharded dim a cut must take whole fused blocks (GPT-2's c_attn into q, k, v)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Partial, Replicate, Shard, same_placement
from fxtp.sharding.op_rules.along_dim import along_dim
from fxtp.sharding.op_rules.helpers import P, R, is_tensor_node, ndim, norm_dim, replicate_all, val
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

aten = torch.ops.aten


# ops that cut a dim into pieces -> the position of their dim argument (dim 0 where it is left out)
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


def strided_slice_step(node: fx.Node, dim: Optional[int] = None) -> Optional[int]:
    """The step of x[..., start::step] (step > 1, start < step: every step-th element of the whole
    dim, as GPT-OSS's interleaved gate|up), along `dim` when given, else None."""
    if node.target is not aten.slice.Tensor or len(node.args) < 5 or not isinstance(node.args[4], int) or node.args[4] < 2:
        return None
    src, (cut, start, end, step) = node.args[0], node.args[1:5]
    size = val(src).shape[norm_dim(cut, ndim(src))]
    whole = isinstance(start, int) and 0 <= start < step and isinstance(end, int) and isinstance(size, int) and end >= size
    return step if whole and (dim is None or norm_dim(cut, ndim(src)) == dim) else None


def cut_blocks(node: fx.Node, lay: LayoutOf) -> Decision:
    """split/chunk/slice: along a sharded dim each piece must be whole fused blocks (GPT-2's
    c_attn split into q, k, v: every rank holds its heads of each), and a strided slice must take
    the same element of every unit (each rank's part starts at a unit); elsewhere as along_dim."""
    layout = lay(node.args[0])
    step = strided_slice_step(node, layout.dim) if isinstance(layout, Shard) else None
    if step is not None:
        if layout.inner % step:
            return replicate_all(node, lay, f"strided slice (step {step}) across the units of the sharded dim")
        return Decision(Shard(layout.dim, layout.counts, layout.inner // step, layout.outer))
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
    """Inputs sharded alike on a dim other than the cat dim stay so, replicated ones sliced to match
    (GPT-OSS's per-head attention sinks joined to head-sharded scores); all Partial stays Partial."""
    # torch.cat skips 1-D empty inputs (T5's empty position bias) whatever the others' shape: they take no part
    # (dims first: a size of a data-dependent split, JetMoE's rows per expert, cannot be compared without a guard)
    inputs = [n for n in node.args[0]
              if is_tensor_node(n) and not (ndim(node) > 1 and ndim(n) == 1 and val(n).shape[0] == 0)]
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    layouts = [lay(n) for n in inputs]
    if all(isinstance(x, Replicate) for x in layouts):
        return Decision(R)
    if all(isinstance(x, Partial) for x in layouts):
        return Decision(P)
    shards = [x for x in layouts if isinstance(x, Shard)]
    if shards and shards[0].dim != dim and \
            all(isinstance(x, Replicate) or isinstance(x, Shard) and same_placement(x, shards[0]) for x in layouts):
        return Decision(shards[0], {n: shards[0] for n, x in zip(inputs, layouts) if isinstance(x, Replicate)})
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


def pad(node: fx.Node, lay: LayoutOf) -> Decision:
    """pad / constant_pad_nd (Mamba-2 pads the sequence to whole chunks): a shard passes where its dim
    gets no padding; a Partial passes a zero constant padding (the sum is padded with zeros)."""
    src, widths = node.args[0], list(node.args[1])
    layout = lay(src)
    mode = node.args[2] if len(node.args) > 2 and node.target is not aten.constant_pad_nd.default else "constant"
    value = node.args[-1] if len(node.args) > 2 and node.target is aten.constant_pad_nd.default else \
        (node.args[3] if len(node.args) > 3 else node.kwargs.get("value"))
    if isinstance(layout, Shard):
        at = 2 * (ndim(src) - 1 - layout.dim)
        if widths[at:at + 2] in ([], [0, 0]):
            return Decision(layout)
        return replicate_all(node, lay, "pad of the sharded dim")
    if isinstance(layout, Partial) and (mode != "constant" or value not in (None, 0, 0.0)):
        return replicate_all(node, lay, "pad of a Partial with a nonzero value")
    return Decision(layout)
