"""The benchmarks' process group: one process per device under torchrun, or a group of one under
plain `python`, so that every impl takes the same path at N = 1 as at N > 1."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fxtp.runtime.rank_processes import free_port


def init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:  # plain `python`: a group of one, so every impl takes the same path
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # an hour: the other ranks wait while rank 0 compiles and times a one-GPU impl
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), dist.get_world_size(), device


def barrier(device: torch.device) -> None:
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def all_gather_objects(value) -> list:
    """`value` of every rank, by rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
