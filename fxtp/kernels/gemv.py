"""A decode step's one-row projections (GEMVs) as one Triton kernel that can prefetch its weights into
L2 while the kernel before it still runs (`DecodeOptions.gemv`, fxtp/decode/options.py), and in a
gated form that also applies a gated MLP's activation (`DecodeOptions.gated_gemv`).

Why fxtp's GEMV and not inductor's: inductor tunes each GEMV by timing it alone, on each rank apart,
so two compilations of one step, and the two ranks of one compilation, choose different block sizes
for the same weight, and every all_reduce waits for the slower rank. This kernel runs at fixed
blocks (`block_sizes`), so every rank and every compilation runs the same code, and its step repeats
its time. Figures: benchmarks/results/decode_step_history.md.

At batch 1 a Llama step on 2 GPUs is 4 GEMVs a layer between latency-bound kernels (push all_reduce
waiting on NVLink, rotary, attention over a short cache), and a GEMV starts streaming its weights
only once the kernel before it has finished. In a step launched with PDL
(fxtp/kernels/dependent_launch.py) the GEMV is scheduled as soon as the kernel before it has released
its dependents, so it can do what needs nothing from that kernel before it waits for it:
- prefetch: its first `prefetchers` programs ask L2 for the first `prefetch_bytes` of the weight,
  each thread one `cp.async.bulk.prefetch.L2` of its share. Off by default
  (`DecodeOptions.gemv_prefetch_bytes`): the prefetch shares the GPU with the kernel it overlaps,
  a latency-bound one that then takes longer (push all_reduce polls L2), which costs about what the
  GEMV gains.
- preload (`DecodeOptions.gemv_preload`, on by default; `launching_with_pdl(on, preload)`): every
  program loads its first BLOCK_K columns of W into registers before its wait, not after it, so the
  programs that fit on the GPU stream their first weights while the kernel before still runs.
  Nothing else changes: ptxas issues a program's loads all at once either way, and only the wait
  moves among them.

The GEMV: program p computes rows [p * BLOCK_N, (p + 1) * BLOCK_N) of `x @ W.T` (+ bias), walking
the columns BLOCK_K at a time with a [BLOCK_N, BLOCK_K] float32 accumulator, summed at the end and
rounded to x's dtype once, bias added in float32 first. The column loop is unrolled (the row length
is a compile-time constant), so ptxas issues the loads of later column blocks before the sums of
earlier ones, as inductor's reductions do, where a loop that loads only the next block's weights
while summing these keeps fewer loads in flight. W's loads are marked to leave L2 first (each weight
is read once a step) and x's to stay. The sum order differs from cuBLAS's and inductor's, so results
equal theirs to float32 rounding, not bit for bit.

Gated (`activation` set; passes/decode/fuse_gated_gemv.py): W's rows are a gate projection's on top of an
up projection's, and the op is a gated MLP's `act(x @ gate.T) * (x @ up.T)`, as the unfused step
computes it after the gate|up GEMV: program p also computes up's rows [p * BLOCK_N, ...), then
rounds both sums to x's dtype, applies `act`, rounds, multiplies, rounds, as the separate ops do.
The activation and product then need no kernel of their own, and the down projection reads a
stored input.

Pushing (`push`: fxtp/kernels/gemv_push.py, `DecodeOptions.gemv_push`, opt-in): the plain GEMV also
writes each output's bits into the peers' buffers of push all_reduce's current round, as
fxtp/kernels/push_all_reduce.py's kernel would, so that kernel only polls and sums after it. It reads
the round after its PDL wait.

Elsewhere (more than one row, as in a prefill or a batch; weights that are not contiguous [out, in];
mixed dtypes; GPUs before Ampere; CPU tensors unless Triton's interpreter is on, as tests/conftest.py
does) the op is `F.linear` (and the gated form the same unfused ops). `launch` counts its launches
(fxtp/kernels/launches.py), so a test can tell the kernel from its fallback.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from typing import NamedTuple, Optional

import torch

import torch.nn.functional as F

from fxtp.kernels.dependent_launch import preloads, uses_pdl
from fxtp.kernels.launches import count_launch
from fxtp.kernels.push_all_reduce import EMPTY_BITS, Peers, bits_type
from fxtp.kernels.triton_device import runs_triton_kernels

aten = torch.ops.aten
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROGRAM_BYTES = 128 * 1024  # of the weight a prefetching program asks L2 for
PREFETCH_BYTES = 32 * 2 ** 20  # at most this much of a weight: two thirds of H100's L2
KERNEL_NAMES = {"plain": "gemv", "gated": "gated_gemv", "rotary": "rotary_gemv"}  # counted by form (launches.py)
# a gated GEMV's activation: the kernel's code for it, and the same function in torch
ACTIVATIONS = {"silu": (1, F.silu), "gelu": (2, F.gelu), "gelu_tanh": (3, lambda x: F.gelu(x, approximate="tanh"))}


@torch.library.custom_op("fxtp::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         prefetch_bytes: int = PREFETCH_BYTES, activation: Optional[str] = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, or with `activation` (a key of ACTIVATIONS) `act(gate) * up` of its
    two halves; one Triton kernel where x holds one row, which launched with PDL prefetches the first
    `prefetch_bytes` of the weight."""
    _check_activation(activation, weight)
    if not kernel_applies(x, weight, bias):
        return F.linear(x, weight, bias) if activation is None else unfused_gated(x, weight, bias, activation)
    return launch(x, weight, bias, prefetch_bytes=prefetch_bytes, activation=activation)


@gemv.register_fake
def _(x, weight, bias=None, prefetch_bytes=PREFETCH_BYTES, activation=None):
    _check_activation(activation, weight)
    return x.new_empty(x.shape[:-1] + (weight.shape[0] // (2 if activation else 1),))


def gated_projection(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     prefetch_bytes: int = PREFETCH_BYTES, activation: str = "silu") -> torch.Tensor:
    """A gated MLP's `act(gate) * up` (passes/decode/fuse_gated_gemv.py's node): the gated `fxtp::gemv` where
    x holds one row, else the unfused ops. torch.compile traces this with static shapes, so a step of
    several rows (a batch) keeps what inductor makes of the unfused ops (a GEMM, then one
    fused kernel for the activation and product) instead of the op's eager fallback."""
    if holds_one_row(x):
        return torch.ops.fxtp.gemv(x, weight, bias, prefetch_bytes=prefetch_bytes, activation=activation)
    _check_activation(activation, weight)
    return unfused_gated(x, weight, bias, activation)


def unfused_gated(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str) -> torch.Tensor:
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return ACTIVATIONS[activation][1](gate) * up


def _check_activation(activation: Optional[str], weight: torch.Tensor) -> None:
    if activation is None:
        return
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxtp::gemv's activation is one of {', '.join(ACTIVATIONS)} or None, got {activation!r}")
    if weight.shape[0] % 2:
        raise ValueError(f"a gated fxtp::gemv's weight holds gate's rows on top of up's, an even number of rows; "
                         f"got a weight of {tuple(weight.shape)}")


def holds_one_row(x: torch.Tensor) -> bool:
    """Whether `x` is one row of features, as a batch-1 decode step's input: where fxtp's GEMVs apply."""
    return x.dim() >= 1 and x.numel() == x.size(-1) > 0


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the GEMV kernel runs `F.linear(x, weight, bias)` here (its rotary form asks more)."""
    return (holds_one_row(x) and weight.dim() == 2 and weight.size(1) == x.size(-1)
            and weight.is_contiguous() and x.dtype == weight.dtype and x.dtype in DTYPES
            and x.device == weight.device and runs_triton_kernels(x.device)
            and (bias is None or (bias.shape == weight.shape[:1] and bias.dtype == x.dtype and bias.is_contiguous())))


def block_sizes(rows: int, columns: int, form: str = "plain") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of `rows` x `columns` in `form` ("plain", "gated":
    gate's and up's rows paired, or "rotary": a head's two halves paired): the table of
    `launching_with_blocks` where it names the shape, else 2048 columns at a time (fewer where a row
    has fewer) and: one row a program over 8 warps where a row has at most 2048 columns; else two rows
    (pairs, gated) over 8 warps where it has more than 4096 or the GEMV is gated; else, rotary, one
    pair over 8 warps with the whole row a step; else one row over 4 warps. Each was the fastest of
    those timed inside the decode step at Llama-3-8B's weights on 2 H100s, where blocks rank otherwise
    than in a GEMV timed alone (benchmarks/results/decode_step_history.md, `block_sizes`); the
    rotary form's were tuned on H100 and are a little slower on H200."""
    table = _BLOCKS.get().get((rows, columns))
    if table:
        return table
    whole_row = 1 << (columns - 1).bit_length()
    block_k = min(2048, whole_row)
    if columns <= 2048:
        return 1, block_k, 8
    if columns > 4096 or form == "gated":
        return 2, block_k, 8
    return (1, whole_row, 8) if form == "rotary" else (1, block_k, 4)


_BLOCKS = contextvars.ContextVar("fxtp_gemv_blocks", default={})


@contextlib.contextmanager
def launching_with_blocks(table: dict):
    """fxtp's GEMVs launched inside take (BLOCK_N, BLOCK_K, num_warps) from `table`, keyed by their
    weight's (rows, columns), where it names their shape (`DecodeOptions.gemv_blocks`, whose value
    `block_table` reads); DecodeGraph holds it while it captures, so the CUDA graph replays them."""
    token = _BLOCKS.set(table)
    try:
        yield
    finally:
        _BLOCKS.reset(token)


def block_table(option: dict) -> dict:
    """`DecodeOptions.gemv_blocks` ({"ROWSxCOLUMNS": [BLOCK_N, BLOCK_K, num_warps]}, JSON-friendly) as
    `launching_with_blocks` takes it; a ValueError that shows the form where anything else is given."""
    form = ('gemv_blocks maps a weight\'s shape to block sizes, {"ROWSxCOLUMNS": [BLOCK_N, BLOCK_K, '
            'num_warps]}, powers of two with num_warps at most 32 (e.g. {"4096x2048": [2, 1024, 8]})')
    if not isinstance(option, dict):
        raise ValueError(f"{form}; got {option!r}")
    table = {}
    for shape, blocks in option.items():
        match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", shape) if isinstance(shape, str) else None
        powers = (isinstance(blocks, (list, tuple)) and len(blocks) == 3
                  and all(type(b) is int and b > 0 and b & (b - 1) == 0 for b in blocks) and blocks[2] <= 32)
        if match is None or not powers:
            raise ValueError(f"{form}; got {shape!r}: {blocks!r}")
        table[int(match[1]), int(match[2])] = tuple(blocks)
    return table


class Rotary(NamedTuple):
    """What the rotary form of the GEMV (fxtp/kernels/rotary_gemv.py) needs beyond x, W and b: the rotation's
    cos and sin ([1, 1, head_dim]), the cache position ([1]), the caches ([1, kv_heads, length, head_dim])
    it writes k and v to, and the number of query heads in W's rows (q's, then k's, then v's)."""
    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    heads: int


def launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           blocks: Optional[tuple[int, int, int]] = None, prefetch_bytes: int = PREFETCH_BYTES,
           activation: Optional[str] = None, rotary: Optional[Rotary] = None,
           preload: Optional[bool] = None, push: Optional[Peers] = None) -> torch.Tensor:
    """Run the kernel on operands `kernel_applies` accepts, with `block_sizes`' blocks or `blocks`;
    launched with PDL it prefetches the first `prefetch_bytes` of the weight, and loads its first
    weights before its wait if `preload` (None: as `launching_with_pdl` says); benchmarks/gemv_latency.py
    times other choices. Gated (`activation`) or rotary (`rotary`), output i pairs the weight's rows
    first(i) = (i // group) * 2 * group + i % group and first(i) + group: gate's row i and up's, with a
    group of half the rows; the two halves of a head's row of features, with a group of half a head.
    Plain, with `push` (the Peers of parts of the output's size) it also writes each output into the
    peers' push all_reduce buffers of the current round (fxtp/kernels/gemv_push.py)."""
    rows, columns = weight.shape
    if push is not None and (activation is not None or rotary is not None):
        raise ValueError("only the plain GEMV pushes its outputs: pass no activation or rotary with push")
    form = "gated" if activation is not None else "rotary" if rotary is not None else "plain"
    block_n, block_k, warps = blocks or block_sizes(rows, columns, form)
    if rotary is not None:
        group = rotary.key_cache.size(-1) // 2
        outputs, epilogue, out = rows // 2, 2, x.new_empty(1, rotary.heads, 1, 2 * group)
    elif activation is not None:
        outputs = group = rows // 2
        epilogue, out = 1, x.new_empty(x.shape[:-1] + (outputs,))
    else:
        outputs = group = rows
        epilogue, out = 0, x.new_empty(x.shape[:-1] + (rows,))
    cache = rotary or Rotary(weight, weight, weight, weight, weight, 0)  # read only by the rotary form
    query_rows = cache.heads * group  # of the outputs (pairs), in the rotary form: q's, k's, v's
    rotated_rows = query_rows + cache.key_cache.size(1) * group
    programs = -(-outputs // block_n)
    pdl = uses_pdl(x.device)
    requests = 32 * warps  # one a thread
    request_elements = PROGRAM_BYTES // requests // weight.element_size()
    aligned = weight.data_ptr() % 16 == 0  # the bulk prefetch's addresses must be
    prefetched = min(prefetch_bytes, weight.nbytes) // weight.element_size() if pdl and aligned else 0
    prefetchers = min(programs, -(-prefetched // (requests * request_elements)))
    peers = push or Peers(weight, weight, 0, 0)  # read only with push
    count_launch("pushing_gemv" if push is not None else KERNEL_NAMES[form])
    triton_kernel()[(programs,)](x.contiguous(), weight, weight if bias is None else bias, out, outputs, group, prefetched,
                           prefetchers, cache.cos, cache.sin, cache.position, cache.key_cache, cache.value_cache,
                           query_rows, rotated_rows, cache.key_cache.stride(1), peers.addresses, peers.state,
                           COLUMNS=columns, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                           PREFETCH=prefetchers > 0, REQUESTS=requests, REQUEST_ELEMENTS=request_elements,
                           EPILOGUE=epilogue, ACTIVATION=ACTIVATIONS[activation][0] if activation else 0, PDL=pdl,
                           PRELOAD=pdl and (preloads() if preload is None else preload), RANK=peers.rank,
                           WORLD=peers.world, BITS=bits_type(x.dtype), EMPTY=EMPTY_BITS[x.dtype],
                           num_warps=warps, launch_pdl=pdl)
    return out


def projection(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               prefetch_bytes: int = PREFETCH_BYTES) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in a decode step (`with_gemv`'s node): `fxtp::gemv` where x holds one
    row, else F.linear. torch.compile traces this with static shapes, so a step of several rows (a
    batch) keeps what inductor makes of F.linear."""
    if holds_one_row(x):
        return torch.ops.fxtp.gemv(x, weight, bias, prefetch_bytes=prefetch_bytes)
    return F.linear(x, weight, bias)


@functools.cache
def triton_kernel():
    """The jitted kernel `launch` runs, built on first use (Triton reads TRITON_INTERPRET when it decorates it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, rows, group, prefetched, prefetchers,
                    cos_ptr, sin_ptr, position_ptr, key_ptr, value_ptr, query_rows, rotated_rows, cache_stride,
                    addresses, state,
                    COLUMNS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PREFETCH: tl.constexpr, REQUESTS: tl.constexpr, REQUEST_ELEMENTS: tl.constexpr,
                    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr,
                    RANK: tl.constexpr, WORLD: tl.constexpr, BITS: tl.constexpr, EMPTY: tl.constexpr):
        # EPILOGUE 0: out[i] = row i's sum, and with WORLD > 0 the same bits pushed to the peers as
        # fxtp/kernels/push_all_reduce.py's kernel pushes them. 1 (gated): act(first's) * second's. 2 (rotary):
        # rotate the pair (q's and k's heads), write q's to out and k's and v's to the caches at the position.
        program = tl.program_id(0)
        if PREFETCH:
            if program < prefetchers:  # before the wait: the weights need nothing from the kernel before
                request = (program * REQUESTS + tl.arange(0, REQUESTS)).to(tl.int64)
                wanted = ((request + 1) * REQUEST_ELEMENTS <= prefetched).to(tl.int32)
                size = tl.full([REQUESTS], REQUEST_ELEMENTS * w_ptr.dtype.element_ty.primitive_bitwidth // 8, tl.int32)
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; "
                    "mov.u32 $0, 0; }", "=r,l,r,r", [w_ptr + request * REQUEST_ELEMENTS, wanted, size],
                    dtype=tl.int32, is_pure=False, pack=1)
        row = program * BLOCK_N + tl.arange(0, BLOCK_N)  # of the output, or of its pairs
        real_row = row < rows
        dtype = out_ptr.dtype.element_ty
        first = row if EPILOGUE == 0 else (row // group) * (2 * group) + row % group
        second = first + group
        first_start, second_start = first.to(tl.int64) * COLUMNS, second.to(tl.int64) * COLUMNS
        column = tl.arange(0, BLOCK_K)
        if PDL and not PRELOAD:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        second_acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in tl.static_range(0, COLUMNS, BLOCK_K):  # unrolled: COLUMNS is a constant
            inside = real_row[:, None] & (start + column < COLUMNS)[None, :]
            w = tl.load(w_ptr + first_start[:, None] + start + column[None, :], mask=inside, other=0,
                        eviction_policy="evict_first")
            if EPILOGUE:
                second_w = tl.load(w_ptr + second_start[:, None] + start + column[None, :], mask=inside, other=0,
                                   eviction_policy="evict_first")
            if start == 0:  # with PRELOAD the first weights are loaded before the wait: they need nothing from it
                if PDL and PRELOAD:
                    tl.extra.cuda.gdc_wait()
                    tl.extra.cuda.gdc_launch_dependents()
                if WORLD:  # after the wait, once the last push kernel has moved the round on; here to hide the load
                    turn = tl.load(state, volatile=True)
            x = tl.load(x_ptr + start + column, mask=start + column < COLUMNS, other=0,
                        eviction_policy="evict_last").to(tl.float32)
            acc += w.to(tl.float32) * x[None, :]
            if EPILOGUE:
                second_acc += second_w.to(tl.float32) * x[None, :]
        total = tl.sum(acc, axis=1)
        if HAS_BIAS:
            total += tl.load(bias_ptr + first, mask=real_row, other=0).to(tl.float32)
        if EPILOGUE:  # both sums rounded to x's dtype first, as the projection's output is
            other = tl.sum(second_acc, axis=1)
            if HAS_BIAS:
                other += tl.load(bias_ptr + second, mask=real_row, other=0).to(tl.float32)
            other = other.to(dtype).to(tl.float32)
            total = total.to(dtype).to(tl.float32)
        if EPILOGUE == 1:  # total: gate, other: up; the unfused ops round the activation too
            if ACTIVATION == 1:  # silu
                total = total * tl.sigmoid(total)
            elif ACTIVATION == 2:  # gelu
                total = 0.5 * total * (1 + tl.erf(total * 0.7071067811865476))
            else:  # gelu, tanh approximation; tanh(y) = 2 sigmoid(2y) - 1
                total = total * tl.sigmoid(1.5957691216057308 * (total + 0.044715 * total * total * total))
            total = total.to(dtype).to(tl.float32) * other
        if EPILOGUE == 2:  # total, other: features j and j + head_dim / 2 of head `row // group`
            head, j = row // group, row % group
            rotated = real_row & (row < rotated_rows)
            # v's pair is not rotated: cos 1, sin 0 (set after the load: with other=1, Triton's
            # interpreter gave 0 for bfloat16)
            cos_j = tl.where(rotated, tl.load(cos_ptr + j, mask=rotated, other=0).to(tl.float32), 1.0)
            cos_k = tl.where(rotated, tl.load(cos_ptr + j + group, mask=rotated, other=0).to(tl.float32), 1.0)
            sin_j = tl.load(sin_ptr + j, mask=rotated, other=0).to(tl.float32)
            sin_k = tl.load(sin_ptr + j + group, mask=rotated, other=0).to(tl.float32)
            total, other = total * cos_j - other * sin_j, other * cos_k + total * sin_k
            position = tl.load(position_ptr)
            in_cache = row * 0 + position < cache_stride // (2 * group)  # no write past the caches' end
            is_query = real_row & (row < query_rows)
            tl.store(out_ptr + head * 2 * group + j, total.to(dtype), mask=is_query)
            tl.store(out_ptr + head * 2 * group + j + group, other.to(dtype), mask=is_query)
            kv_head = tl.where(rotated, head - query_rows // group, head - rotated_rows // group)
            cached = kv_head.to(tl.int64) * cache_stride + position * 2 * group + j
            is_key = rotated & (row >= query_rows) & in_cache
            tl.store(key_ptr + cached, total.to(dtype), mask=is_key)
            tl.store(key_ptr + cached + group, other.to(dtype), mask=is_key)
            is_value = real_row & (row >= rotated_rows) & in_cache
            tl.store(value_ptr + cached, total.to(dtype), mask=is_value)
            tl.store(value_ptr + cached + group, other.to(dtype), mask=is_value)
        else:
            tl.store(out_ptr + row, total.to(dtype), mask=real_row)
            if WORLD:
                part = total.to(dtype).to(BITS, bitcast=True)
                part = tl.where(part == EMPTY, 0, part)
                for peer in tl.static_range(WORLD):
                    if peer != RANK:
                        theirs = tl.load(addresses + peer).to(tl.pointer_type(BITS))
                        tl.store(theirs + (turn * WORLD + RANK) * rows + row, part, mask=real_row)

    return gemv_kernel
