"""Ranks that were given different inputs are caught before they compute a wrong answer.

Every rank of a tensor-parallel program must run the same step on the same inputs: a rank fed other
token ids (or another batch shape, or other generation arguments) still "succeeds", and each rank's
all_reduce sums parts of different computations, so every rank returns a plausible, wrong result. So
each rank all-gathers a small fingerprint of what it was given (shapes, dtypes, two cheap checksums of
each integer tensor, the other arguments' reprs) and compares: any difference is a `RanksDisagree`
raised on every rank, naming what differs and each rank's value.

Cost: one all_gather of a few hundred bytes, and a host sync for the checksums, per checked call. The
eager paths check every call; the compiled CUDA-graph decode step checks nothing per token, since its
inputs are made by the generator, which checks its own arguments once per generate call.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class RanksDisagree(RuntimeError):
    """The ranks of one program were given different inputs."""


def describe(value: Any) -> str:
    """What a rank compares of one input: a tensor's dtype, shape and, for integer tensors (token ids,
    masks), its sum and its position-weighted sum (two ids swapped change the second)."""
    if isinstance(value, torch.Tensor):
        text = f"{value.dtype} {list(value.shape)}"
        if not value.dtype.is_floating_point and not value.dtype.is_complex and value.numel():
            flat = value.reshape(-1).to(torch.int64)
            weights = torch.arange(1, flat.numel() + 1, device=flat.device)
            sums = torch.stack([flat.sum(), (flat * weights).sum()]).tolist()
            text += f" sum={sums[0]} weighted={sums[1]}"
        return text
    return repr(value)


def check_ranks_agree(group: dist.ProcessGroup, what: str, values: dict[str, Any]) -> None:
    """Raise RanksDisagree on every rank of `group` unless all of them were given equal `values`."""
    mine = {name: describe(value) for name, value in values.items()}
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differ = [name for name in mine if len({str(ranks.get(name)) for ranks in everyone}) > 1]
    differ += sorted({name for ranks in everyone for name in ranks} - set(mine))
    if differ:
        lines = [f"  {name}: " + "; ".join(f"rank {r} has {ranks.get(name, 'nothing')}" for r, ranks in enumerate(everyone))
                 for name in differ]
        raise RanksDisagree(f"the ranks were given different {what}; every rank must get the same:\n" + "\n".join(lines))
