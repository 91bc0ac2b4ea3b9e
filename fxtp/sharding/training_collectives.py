"""The collectives of rank graphs that train: each one's backward is its conjugate (Megatron's f and g).

Every rank runs autograd over its own graph, so the backward must keep the forward's contract:
the gradient of a replicated value is the same full gradient on every rank, that of a shard is the
rank's part of it.
- `reduce_partial` (g): all_reduce of a Partial. Its output is replicated, so each rank already
  holds the whole gradient, which is the gradient of its own term: backward is the identity.
- `reduce_gradient` (f): the identity, placed where a replicated value feeds an op whose output is
  sharded or Partial (passes/codegen/rewrite.py). Each rank's backward through that op gives only
  its share of the value's gradient, so backward all-reduces them.
- `gather_shard`: all_gather of a shard. Its gradient is replicated; backward keeps this rank's part.
fxtp/runtime/simulate.py runs the same three in one process with every rank's value at hand.
"""
from __future__ import annotations

import torch

from fxtp.sharding.collectives import all_gather_shard, all_reduce, local_part


class _ReducePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        return all_reduce(x, "sum", group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, "sum", ctx.group_name), None


class _GatherShard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, counts: tuple, inner: int, outer: int, group_name: str,
                rank: int) -> torch.Tensor:
        ctx.shard = (dim, counts, inner, outer, rank)
        return all_gather_shard(x, dim, counts, inner, outer, group_name)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (local_part(grad, *ctx.shard),) + (None,) * 6


def reduce_partial(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum over ranks of the Partial `x`; backward: the identity."""
    return _ReducePartial.apply(x, group_name)


def reduce_gradient(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """`x` (replicated); backward: the sum over ranks of its gradient."""
    return _ReduceGradient.apply(x, group_name)


def gather_shard(x: torch.Tensor, dim: int, counts: tuple, inner: int, outer: int, group_name: str,
                 rank: int) -> torch.Tensor:
    """collectives.all_gather_shard of `x`, rank `rank`'s part; backward: that part of the gradient."""
    return _GatherShard.apply(x, dim, counts, inner, outer, group_name, rank)
