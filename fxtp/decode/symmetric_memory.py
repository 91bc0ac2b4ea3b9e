"""Whether symmetric memory works between a group's ranks: what inductor's one-shot all_reduce and
fxtp's push all_reduce need (fxtp/decode/options.py chooses their defaults by it)."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from fxtp.sharding.collectives import process_group_named


def symmetric_memory_works(group_name: str, device: torch.device) -> bool:
    """Whether every rank of the group can map its peers' memory (CUDA P2P over NVLink); a collective,
    so all ranks get the same answer. Enables symmetric memory on the group for inductor."""
    import torch.distributed._symmetric_memory as symm_mem

    try:
        probe = symm_mem.empty(64, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(probe, group_name)
        works = 1
    except Exception as error:  # e.g. no P2P between the GPUs, or a container without the IPC it needs
        warnings.warn(f"symmetric memory does not work here, all_reduce stays NCCL: {error}")
        works = 0
    group = process_group_named(group_name)
    flag = torch.tensor([works], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        return False
    with warnings.catch_warnings():  # deprecated in newer torch, where inductor still checks it
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group_name)
    return True
