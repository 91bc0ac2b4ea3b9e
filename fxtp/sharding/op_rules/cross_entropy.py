"""cross_entropy over logits sharded along the vocabulary (a column-parallel lm_head), without
gathering them: Megatron's vocab-parallel cross-entropy, torch's loss_parallel.

Each rank holds the logits of a contiguous range of the vocabulary. The loss of a row is
log(sum_v exp(x_v)) - x_target: one all_reduce of the row maxima (max, for stability), one of the
sums of exponentials, and one of the target logit, which only the rank owning the target holds.
Backward needs no communication: a rank's gradient is softmax - one_hot on its own columns.
fxtp/runtime/simulate.py computes the same loss from every rank's logits in one process.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.sharding.collectives import all_reduce
from fxtp.sharding.layouts import Replicate, Shard
from fxtp.sharding.op_rules.helpers import R, arg, ndim, replicate_all, shard_of
from fxtp.sharding.op_rules.rule import Decision, LayoutOf

MEAN, SUM = 1, 2  # ATen's reduction enum (0: none)


def _options(node: fx.Node) -> tuple:
    return (arg(node, 2, "weight"), arg(node, 3, "reduction"), arg(node, 4, "ignore_index"),
            arg(node, 5, "label_smoothing"))


def cross_entropy(node: fx.Node, lay: LayoutOf) -> Decision:
    """cross_entropy_loss(x[N, C], target[N]) with x sharded along C in contiguous ranges (no class
    weights, no label smoothing): a replicated loss, computed by each rank from its own columns."""
    x, target = node.args[0], node.args[1]
    weight, _, _, smoothing = _options(node)
    s = shard_of(x, lay)
    if s is None:
        return Decision(R) if all(isinstance(lay(n), Replicate) for n in (x, target)) else replicate_all(node, lay)
    if ndim(x) != 2 or s.dim != 1 or s.inner != 1 or s.outer != 1 or weight is not None or smoothing:
        return replicate_all(node, lay, "cross entropy sharded other than along the classes of [N, C] logits, "
                                        "or with class weights or label smoothing")
    return Decision(R, {} if isinstance(lay(target), Replicate) else {target: R})


def lower_cross_entropy(node, args, kwargs, input_layout, rank, group_name):
    """A rank's cross entropy over its vocabulary columns: vocab_parallel_cross_entropy."""
    layout = input_layout(node.args[0])
    if not isinstance(layout, Shard) or len(layout.counts) == 1:  # one rank holds every class: ATen's own
        return node.target, args, kwargs
    _, reduction, ignore_index, _ = _options(node)
    reduction = MEAN if reduction is None else reduction
    ignore_index = -100 if ignore_index is None else ignore_index
    return vocab_parallel_cross_entropy, (args[0], args[1], reduction, ignore_index, layout.unit_start(rank),
                                          group_name), {}


def _reduce(losses: torch.Tensor, counted: torch.Tensor, reduction: int) -> torch.Tensor:
    if reduction == MEAN:
        return losses.sum() / counted.sum()
    return losses.sum() if reduction == SUM else losses


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, reduction, ignore_index, vocab_start, group_name):
        row_max = all_reduce(x.detach().amax(1), "max", group_name)
        exp = (x - row_max.unsqueeze(1)).exp()
        total = all_reduce(exp.sum(1), "sum", group_name)
        local = target - vocab_start
        owned = (local >= 0) & (local < x.size(1))
        index = local.masked_fill(~owned, 0).unsqueeze(1)
        picked = all_reduce(x.gather(1, index).squeeze(1).masked_fill(~owned, 0), "sum", group_name)
        counted = target != ignore_index
        losses = ((total.log() + row_max) - picked).masked_fill(~counted, 0)
        ctx.save_for_backward(exp, total, index, owned, counted)
        ctx.reduction = reduction
        return _reduce(losses, counted, reduction)

    @staticmethod
    def backward(ctx, grad):
        exp, total, index, owned, counted = ctx.saved_tensors
        grad_x = exp / total.unsqueeze(1)
        grad_x.scatter_add_(1, index, -owned.to(grad_x.dtype).unsqueeze(1))
        if ctx.reduction == MEAN:
            per_row = grad / counted.sum()
        else:
            per_row = grad.expand(counted.shape) if ctx.reduction == SUM else grad
        grad_x = grad_x * (per_row * counted).unsqueeze(1)
        return grad_x, None, None, None, None, None


def vocab_parallel_cross_entropy(x: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int,
                                 vocab_start: int, group_name: str) -> torch.Tensor:
    """cross_entropy(full logits, target) from `x`, this rank's columns [vocab_start, vocab_start + C_r)."""
    return _VocabParallelCrossEntropy.apply(x, target, reduction, ignore_index, vocab_start, group_name)
