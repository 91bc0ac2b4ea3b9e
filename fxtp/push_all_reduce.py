"""A decode step's all_reduce in one kernel with no barrier: each rank pushes its part into its
peers' symmetric memory and polls its own until every peer's part has landed.

Symmetric memory's one-shot all_reduce (what inductor's `_collective.auto_select` lowers to) makes
the ranks meet at signal pads before and after reading each other's buffers, two NVLink round
trips a call: ~10 us on H100 however small the message, 65 times a Llama-3-8B step. Here a rank
writes its part straight into every peer's buffer and reads only its own, so a call is one NVLink
write and a poll.

How a reader knows a part has landed (Lamport's trick): empty slots hold the bits of -0.0, and
parts are written with -0.0 made +0.0, so an element that no longer reads -0.0 has arrived. Every
element is its own flag, so no fence or flag write is needed.
How slots are emptied again: three buffers rotate. Round k writes buffer k % 3 and empties buffer
(k + 2) % 3, round k - 1's, whose parts this rank has read. A peer writes that buffer again only in
round k + 2, which it starts after reading this rank's round k + 1 part, written after the emptying.
The round lives on the GPU and the kernel's last block advances it, so replays of a CUDA graph use
the right buffers. As with any collective, all ranks make the same calls in the same order; each
(group, dtype, size) has its own buffers and round. The sum runs in float32 over ranks in rank
order, so every rank gets the same bits.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from fxtp.collectives import ALL_REDUCE, WAIT
from fxtp.twin import twin

# Larger parts go to NCCL. Up to here push was the fastest on 2 and 4 GPUs (README, all_reduce_latency.py),
# and its 256 programs are all resident at once: a program spins until its peers' programs have run.
MAX_BYTES = 512 * 1024
BLOCK = 1024  # elements a kernel program pushes and sums
EMPTY_BITS = {torch.bfloat16: -2 ** 15, torch.float16: -2 ** 15, torch.float32: -2 ** 31}  # -0.0
BITS_DTYPE = {2: torch.int16, 4: torch.int32}


class _Workspace:
    """One (group, dtype, numel)'s buffers on this rank: [3 rounds, world, numel] of -0.0 bits in
    symmetric memory, the address of every rank's copy, and [round, programs arrived]."""

    def __init__(self, group_name: str, dtype: torch.dtype, numel: int, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        world = torch.distributed.distributed_c10d._resolve_process_group(group_name).size()
        self.buffer = symm_mem.empty(3 * world * numel, dtype=BITS_DTYPE[dtype.itemsize], device=device)
        self.buffer.fill_(EMPTY_BITS[dtype])
        torch.cuda.synchronize(device)  # emptied before the rendezvous lets any peer write to it
        handle = symm_mem.rendezvous(self.buffer, group_name)
        offset = self.buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        self.addresses = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.state = torch.zeros(2, dtype=torch.int32, device=device)
        self.rank, self.world = handle.rank, handle.world_size


_WORKSPACES: dict[tuple, _Workspace] = {}


def _workspace(group_name: str, x: torch.Tensor) -> _Workspace:
    key = (group_name, x.dtype, x.numel(), x.device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(group_name, x.dtype, x.numel(), x.device)
    return _WORKSPACES[key]


@torch.library.custom_op("fxtp::push_all_reduce", mutates_args=())
def push_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the ranks of the group: pushed on CUDA, NCCL's (gloo's on the CPU) for
    parts over MAX_BYTES or of other dtypes."""
    if x.device.type != "cuda" or x.numel() * x.element_size() > MAX_BYTES or x.dtype not in EMPTY_BITS:
        return WAIT(ALL_REDUCE(x, "sum", group_name))
    workspace = _workspace(group_name, x)
    return launch(x.contiguous(), workspace.addresses, workspace.state, workspace.rank, workspace.world)


def launch(x: torch.Tensor, addresses: torch.Tensor, state: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Run one round of the kernel: push contiguous `x` to the buffers at `addresses` (every rank's,
    in rank order), return the sum; `state` is this rank's [round, programs arrived]."""
    kernel, integer_types = _kernel()
    out = torch.empty_like(x)
    kernel[(-(-x.numel() // BLOCK),)](x, out, addresses, state, x.numel(), RANK=rank, WORLD=world,
                                      BITS=integer_types[x.element_size()], EMPTY=EMPTY_BITS[x.dtype], BLOCK=BLOCK)
    return out


@push_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def with_push_all_reduce(module: fx.GraphModule) -> fx.GraphModule:
    """A twin of `module` (fxtp/twin.py) whose sum all_reduces (`all_reduce` + `wait_tensor`) are
    `fxtp::push_all_reduce` calls."""
    pushed_twin = twin(module, "Pushed")
    graph = pushed_twin.graph
    for node in list(graph.nodes):
        if node.target is not ALL_REDUCE or node.args[1] != "sum":
            continue
        (wait,) = node.users
        with graph.inserting_before(node):
            pushed = graph.call_function(torch.ops.fxtp.push_all_reduce.default, (node.args[0], node.args[2]))
        pushed.meta = dict(wait.meta)
        wait.replace_all_uses_with(pushed)
        graph.erase_node(wait)
        graph.erase_node(node)
    pushed_twin.recompile()
    return pushed_twin


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def push_all_reduce_kernel(x_ptr, out_ptr, addresses, state, numel, RANK: tl.constexpr, WORLD: tl.constexpr,
                               BITS: tl.constexpr, EMPTY: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        turn = tl.load(state, volatile=True)
        part = tl.load(x_ptr + offsets, mask=inside, other=0).to(BITS, bitcast=True)
        part = tl.where(part == EMPTY, 0, part)
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                theirs = tl.load(addresses + peer).to(tl.pointer_type(BITS))
                tl.store(theirs + (turn * WORLD + RANK) * numel + offsets, part, mask=inside)
        mine = tl.load(addresses + RANK).to(tl.pointer_type(BITS))
        total = tl.zeros([BLOCK], tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                bits = part
            else:
                slot = mine + (turn * WORLD + peer) * numel + offsets
                bits = tl.load(slot, mask=inside, other=0, volatile=True)
                while tl.max((bits == EMPTY).to(tl.int32), axis=0) > 0:
                    bits = tl.load(slot, mask=inside, other=0, volatile=True)
            total += bits.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        previous = (turn + 2) % 3
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                tl.store(mine + (previous * WORLD + peer) * numel + offsets,
                         tl.full([BLOCK], EMPTY, BITS), mask=inside)
        tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=inside)
        if tl.atomic_add(state + 1, 1) == tl.num_programs(0) - 1:  # the last program moves on a round
            tl.store(state + 1, 0)
            tl.store(state, (turn + 1) % 3)

    return push_all_reduce_kernel, {2: tl.int16, 4: tl.int32}
