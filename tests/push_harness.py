"""Shared CPU memory standing in for symmetric memory, for running fxtp/kernels/push_all_reduce.py's kernel
in Triton's interpreter on real processes (tests/test_push_all_reduce.py, tests/test_push_norm.py)."""
from __future__ import annotations

import os

import torch

from fxtp.kernels import push_all_reduce as pushed


def shared_workspaces(world: int, dtype: torch.dtype, numel: int) -> tuple[list, list]:
    """Every rank's buffers (three rounds of `world` empty parts) and [round, programs arrived]."""
    buffers = [torch.full((3 * world * numel,), pushed.EMPTY_BITS[dtype], dtype=pushed.BITS_DTYPE[dtype.itemsize])
               .share_memory_() for _ in range(world)]
    states = [torch.zeros(2, dtype=torch.int32).share_memory_() for _ in range(world)]
    return buffers, states


def interpreted_addresses(buffers: list) -> torch.Tensor:
    """In a rank body: the buffers' addresses in this process, with the kernel set to run in the
    interpreter (the variable is read when the kernel is decorated, on the first _kernel())."""
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)


def assert_rotated(buffers: list, states: list, rounds: int, dtype: torch.dtype) -> None:
    """After `rounds` calls: the round moved on once a call, the last round's buffer holds the peers'
    parts and the one before it was emptied by the last round."""
    world = len(buffers)
    for rank in range(world):
        assert states[rank].tolist() == [rounds % 3, 0]
        slots = buffers[rank].view(3, world, -1)
        assert (slots[(rounds - 2) % 3] == pushed.EMPTY_BITS[dtype]).all()
        peers = [r for r in range(world) if r != rank]
        assert not (slots[(rounds - 1) % 3, peers] == pushed.EMPTY_BITS[dtype]).all()
