"""Moving shards between ranks: the functions rank graphs call besides ATen ops.

all_reduce is emitted as the functional ATen ops themselves
(`_c10d_functional.all_reduce` + `wait_tensor`) so torch.compile sees them; an uneven,
structured all_gather is a small Python function over `all_gather_into_tensor`.
`local_part` and `assemble` are the two directions between a full tensor and its shards; the
simulator and the checkpoint loader use them too.
"""
from __future__ import annotations

import torch

from fxtp.sharding.layouts import Shard

c10d = torch.ops._c10d_functional
ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default
SIMULATED_GROUP = "fxtp-simulated"



def all_reduce(x: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    """all_reduce of `x` with `op` ("sum", "max", ...), waited for: for functions that run collectives
    themselves (the training collectives, vocab-parallel cross entropy) rather than as graph nodes."""
    return WAIT(ALL_REDUCE(x.contiguous(), op, group_name))


def shard_args(s: Shard) -> tuple:
    """Shard as the (dim, counts, inner, outer) arguments of local_part, assemble and all_gather_shard in a
    rank graph's call; a symbolic inner/outer is -1 (read from the size)."""
    return (s.dim, s.counts, s.inner if isinstance(s.inner, int) else -1, s.outer if isinstance(s.outer, int) else -1)


def process_group_named(group_name: str) -> torch.distributed.ProcessGroup:
    """The process group a rank graph's collectives name (functional collectives take group names);
    raises where no such group exists in this process."""
    return torch.distributed.distributed_c10d._resolve_process_group(group_name)

def local_part(x: torch.Tensor, dim: int, counts: tuple, inner: int, outer: int, rank: int) -> torch.Tensor:
    """The elements of `x` that `rank` owns under Shard(dim, counts, inner, outer); an outer or
    inner of -1 is read from x's size (a symbolic one: Bloom's ALiBi [batch*heads, 1, s])."""
    if inner == -1 or outer == -1:
        start = sum(counts[:rank])
        blocks = x.unflatten(dim, (outer, sum(counts), inner))
        return blocks.narrow(dim + 1, start, counts[rank]).flatten(dim, dim + 2)
    pieces = [x.narrow(dim, lo, hi - lo) for lo, hi in Shard(dim, tuple(counts), inner, outer).owned_ranges(rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def assemble(parts: list[torch.Tensor], dim: int, counts: tuple, inner: int, outer: int) -> torch.Tensor:
    """The full tensor from every rank's local part (inverse of local_part)."""
    blocks = []
    for o in range(outer):
        for part, count in zip(parts, counts):
            size = count * inner
            blocks.append(part.narrow(dim, o * size, size))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim)


def all_gather_shard(x: torch.Tensor, dim: int, counts: tuple, inner: int, outer: int, group_name: str) -> torch.Tensor:
    """Replicate a (possibly uneven) shard: pad to the largest part, gather along dim 0, unpad."""
    world_size = len(counts)
    longest = max(counts) * inner * outer
    pad = longest - x.shape[dim]
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:dim], pad, *x.shape[dim + 1:])], dim)
    stacked = c10d.all_gather_into_tensor.default(x.movedim(dim, 0).contiguous(), world_size, group_name)
    stacked = c10d.wait_tensor.default(stacked)
    parts = [p.movedim(0, dim).narrow(dim, 0, c * inner * outer) for p, c in zip(stacked.chunk(world_size), counts)]
    return assemble(parts, dim, counts, inner, outer)
