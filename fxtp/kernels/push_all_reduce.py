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
order, so every rank gets the same bits. A GEMV may push a rank's part itself as it computes it
(fxtp/kernels/gemv_push.py); the kernel after it then only polls and sums (`pushed`).

The kernel can also finish a Llama decoder layer's residual add and the next layer's RMSNorm
(`fxtp::push_all_reduce_add_rms_norm`, fused into decode steps by passes/decode/fuse_add_rms_norm.py, as
TensorRT-LLM fuses them into its all_reduce): then each program owns whole rows of the hidden
states, pushes and sums them as above, adds the residual and normalizes the row, so the norm is
no kernel of its own. It rounds where the graph does (`add_rms_norm`). It shares the
(group, dtype, size) buffers and round of plain calls: both are rounds of the same kernel.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch


from fxtp.kernels.dependent_launch import uses_pdl
from fxtp.kernels.launches import count_launch

# Larger parts go to NCCL: up to here push was the fastest all_reduce on 2 and 4 GPUs
# (benchmarks/all_reduce_latency.py; benchmarks/results/decode_step_history.md), and its 256 programs
# are all resident at once, which it needs: a program spins until its peers' programs have run.
MAX_BYTES = 512 * 1024
BLOCK = 1024  # elements a kernel program pushes and sums
EMPTY_BITS = {torch.bfloat16: -2 ** 15, torch.float16: -2 ** 15, torch.float32: -2 ** 31}  # -0.0
BITS_DTYPE = {2: torch.int16, 4: torch.int32}
# A program of the norm epilogue holds a row, 8 elements a thread as a plain program's BLOCK over 4
# warps: 8192 is 32 warps, the most a program has (Llama-3-70B's hidden size). Longer rows are summed
# by plain push and normalized by torch.
MAX_ROW = 8192
MAX_ROWS = MAX_BYTES // (2 * BLOCK)  # as many programs as a plain call of MAX_BYTES, all resident at once


class Peers(NamedTuple):
    """What a rank's kernels need to push parts of one (group, dtype, numel): the address of every
    rank's buffers (in rank order), this rank's [round, programs arrived], its rank and the world size."""
    addresses: torch.Tensor
    state: torch.Tensor
    rank: int
    world: int


class _Workspace:
    """One (group, dtype, numel)'s buffers on this rank: [3 rounds, world, numel] of -0.0 bits in
    symmetric memory, and its Peers."""

    def __init__(self, group_name: str, dtype: torch.dtype, numel: int, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        world = torch.distributed.distributed_c10d._resolve_process_group(group_name).size()
        self.buffer = symm_mem.empty(3 * world * numel, dtype=BITS_DTYPE[dtype.itemsize], device=device)
        self.buffer.fill_(EMPTY_BITS[dtype])
        torch.cuda.synchronize(device)  # emptied before the rendezvous lets any peer write to it
        handle = symm_mem.rendezvous(self.buffer, group_name)
        offset = self.buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        addresses = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        self.peers = Peers(addresses, torch.zeros(2, dtype=torch.int32, device=device), handle.rank, handle.world_size)


_WORKSPACES: dict[tuple, _Workspace] = {}


def peers_of(group_name: str, dtype: torch.dtype, numel: int, device: torch.device) -> Peers:
    """The Peers of the group's push buffers for parts of `numel` elements of `dtype` on `device`,
    made (a collective) on their first use."""
    key = (group_name, dtype, numel, device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(group_name, dtype, numel, device)
    return _WORKSPACES[key].peers


def takes(dtype: torch.dtype, numel: int) -> bool:
    """Whether the kernel sums parts of `numel` elements of `dtype` (on a GPU): up to MAX_BYTES, of a
    dtype it has empty bits for."""
    return dtype in EMPTY_BITS and numel * dtype.itemsize <= MAX_BYTES


@torch.library.custom_op("fxtp::push_all_reduce", mutates_args=())
def push_all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the ranks of the group: pushed on CUDA, NCCL's (gloo's on the CPU) for
    parts over MAX_BYTES or of other dtypes."""
    if x.device.type != "cuda" or not takes(x.dtype, x.numel()):
        return torch.ops._c10d_functional.wait_tensor.default(torch.ops._c10d_functional.all_reduce.default(x, "sum", group_name))
    return launch(x.contiguous(), *peers_of(group_name, x.dtype, x.numel(), x.device))


def launch(x: torch.Tensor, addresses: torch.Tensor, state: torch.Tensor, rank: int, world: int,
           pushed: bool = False) -> torch.Tensor:
    """Run one round of the kernel: push contiguous `x` to the buffers at `addresses` (every rank's,
    in rank order), return the sum; `state` is this rank's [round, programs arrived]. `pushed`: the
    kernel before has already written `x` to the peers' buffers this round (fxtp/kernels/gemv.py's push
    epilogue), so this one only sums."""
    out = torch.empty_like(x)
    _run(x, out, addresses, state, rank, world, programs=-(-x.numel() // BLOCK), BLOCK=BLOCK, PUSHED=pushed)
    return out


def launch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                        addresses: torch.Tensor, state: torch.Tensor, rank: int, world: int,
                        pushed: bool = False) -> tuple:
    """`launch` with the norm epilogue, one program a row of contiguous `x`: returns
    `add_rms_norm(sum, residual, weight, eps, x.dtype)`; `residual` is contiguous and of x's shape
    and dtype, `weight` contiguous of x.shape[-1] elements."""
    row = x.shape[-1]
    block = 1 << (row - 1).bit_length()
    hidden = torch.empty_like(x)
    normed = torch.empty_like(x, dtype=torch.promote_types(weight.dtype, x.dtype))
    _run(x, hidden, addresses, state, rank, world, programs=x.numel() // row, BLOCK=block, PUSHED=pushed,
         residual_ptr=residual, weight_ptr=weight, normed_ptr=normed, ROW=row, EPS=eps,
         num_warps=max(1, block // 256))  # 8 elements a thread (MAX_ROW)
    return hidden, normed


def bits_type(dtype: torch.dtype):
    """The Triton integer type that holds `dtype`'s bits, as the buffers do."""
    import triton.language as tl

    return {2: tl.int16, 4: tl.int32}[dtype.itemsize]


def _run(x: torch.Tensor, out: torch.Tensor, addresses: torch.Tensor, state: torch.Tensor, rank: int, world: int,
         programs: int, **epilogue) -> None:
    pdl = uses_pdl(x.device)
    count_launch("push_all_reduce_add_rms_norm" if "ROW" in epilogue else "push_all_reduce")
    _kernel()[(programs,)](x, out, addresses, state, x.numel(), RANK=rank, WORLD=world, BITS=bits_type(x.dtype),
                           EMPTY=EMPTY_BITS[x.dtype], PDL=pdl, **epilogue, launch_pdl=pdl)


@push_all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return torch.empty_like(x)


def add_rms_norm(total: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 normalized_dtype: Optional[torch.dtype]) -> tuple:
    """The residual add and RMSNorm after an all_reduce as a Llama decoder layer's graph computes
    them, from the all_reduce's sum: (hidden, normed). With `normalized_dtype` the statistics are
    taken in float32 and the normalized hidden states rounded to it before the weight multiply
    (HF's bf16/fp16 graphs); with None all runs in hidden's dtype (float32 graphs, whose casts
    were identities)."""
    hidden = residual + total
    upcast = hidden if normalized_dtype is None else hidden.to(torch.float32)
    normalized = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
    return hidden, weight * (normalized if normalized_dtype is None else normalized.to(normalized_dtype))


@torch.library.custom_op("fxtp::push_all_reduce_add_rms_norm", mutates_args=())
def push_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 normalized_dtype: Optional[torch.dtype], group_name: str
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(push_all_reduce(x), ...)`: on CUDA one launch of the push kernel with the norm
    epilogue where it computes the same (statistics in float32, normalized values rounded to x's
    dtype, x's shape for the residual, one weight a column, rows up to MAX_ROW); otherwise
    push_all_reduce (NCCL's or gloo's where it falls back) and torch ops."""
    if x.device.type == "cuda" and fits_norm_epilogue(x, residual, weight, normalized_dtype):
        return launch_add_rms_norm(x.contiguous(), residual.contiguous(), weight.contiguous(), eps,
                                   *peers_of(group_name, x.dtype, x.numel(), x.device))
    return add_rms_norm(push_all_reduce(x, group_name), residual, weight, eps, normalized_dtype)


def fits_norm_epilogue(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       normalized_dtype: Optional[torch.dtype]) -> bool:
    """Whether the norm epilogue computes `add_rms_norm(sum of x, residual, weight, ...)` (x may be
    on the meta device: only its shape and dtype are read)."""
    row = x.shape[-1]
    statistics_in_float32 = normalized_dtype is not None or x.dtype == torch.float32
    return (statistics_in_float32 and normalized_dtype in (None, x.dtype) and takes(x.dtype, x.numel())
            and row <= MAX_ROW and x.numel() // row <= MAX_ROWS
            and residual.shape == x.shape and residual.dtype == x.dtype and weight.shape == (row,)
            and torch.promote_types(weight.dtype, x.dtype) in EMPTY_BITS)


@push_all_reduce_add_rms_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
      normalized_dtype: Optional[torch.dtype], group_name: str) -> tuple:
    return add_rms_norm(torch.empty_like(x), residual, weight, eps, normalized_dtype)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def push_all_reduce_kernel(x_ptr, out_ptr, addresses, state, numel, RANK: tl.constexpr, WORLD: tl.constexpr,
                               BITS: tl.constexpr, EMPTY: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                               PUSHED: tl.constexpr, residual_ptr=None, weight_ptr=None, normed_ptr=None,
                               ROW: tl.constexpr = 0, EPS: tl.constexpr = 0.0):
        if PDL:  # fxtp/kernels/dependent_launch.py: the next kernel may start its own work while this one waits on its peers
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # ROW > 0: the norm epilogue, a program a row of ROW elements, out_ptr gets the residual added
        if ROW:
            columns = tl.arange(0, BLOCK)
            offsets = tl.program_id(0) * ROW + columns
            inside = columns < ROW
        else:
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < numel
        turn = tl.load(state, volatile=True)
        part = tl.load(x_ptr + offsets, mask=inside, other=0).to(BITS, bitcast=True)
        part = tl.where(part == EMPTY, 0, part)
        if not PUSHED:
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
        if ROW:  # add_rms_norm's rounding: the sum, hidden and the normalized row in x's dtype
            total = total.to(x_ptr.dtype.element_ty).to(tl.float32)
            total += tl.load(residual_ptr + offsets, mask=inside, other=0).to(tl.float32)
            hidden = total.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offsets, hidden, mask=inside)
            upcast = hidden.to(tl.float32)
            normalized = upcast * tl.math.rsqrt(tl.sum(upcast * upcast, axis=0) / ROW + EPS)
            normalized = normalized.to(out_ptr.dtype.element_ty).to(tl.float32)
            weight = tl.load(weight_ptr + columns, mask=inside, other=0).to(tl.float32)
            tl.store(normed_ptr + offsets, (weight * normalized).to(normed_ptr.dtype.element_ty), mask=inside)
        else:
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=inside)
        if tl.atomic_add(state + 1, 1) == tl.num_programs(0) - 1:  # the last program moves on a round
            tl.store(state + 1, 0)
            tl.store(state, (turn + 1) % 3)

    return push_all_reduce_kernel
