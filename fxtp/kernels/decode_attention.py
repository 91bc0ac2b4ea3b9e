"""Attention for a decode step's few query rows in one Triton kernel, on by default in compiled
decode steps (`DecodeOptions.decode_attention`, fxtp/decode/options.py). cuDNN's SDPA, which the
compiled step runs otherwise, is made for many query rows: over a long cache it keeps few programs
busy, and its time grows with the cache almost regardless of batch. This kernel splits the keys
between programs, so that enough of them read the cache (benchmarks/attention_latency.py times both;
figures in benchmarks/results/decode_step_history.md).

A decode step attends a handful of query rows to the KV cache: Llama-3-8B on 2 GPUs folds
(passes/codegen/fold_grouped_query.py) each layer's query to 4 rows per kv head over a [1, 4, 256, 128]
cache. `fxtp::decode_attention` computes `grouped_query_attention` with one kernel:

- grid (batch * kv heads, splits of the keys). A program loads the n * s query rows of its kv
  head's group (head h reads kv head h // n), padded to 16 rows for tl.dot, and walks its share of
  the keys BLOCK_KEYS at a time with an online softmax in float32: scores, mask, p @ v.
- The keys are split (`split_keys`) so that enough programs read the cache: batch 1 over 8192
  keys runs 16 splits a kv head, batch 64 one. With several, each program writes its partial (row
  max, row sum, p @ v) to a float32 scratch and counts itself in its group's arrival counter; the
  last to arrive merges the partials and writes the output, and sets the counter back to 0. The
  counters are cached per (device, groups), so they stay the same tensors across calls and
  CUDA-graph replays, as push_all_reduce's state does; calls sharing counters must run in stream
  order.

Scores and sums are float32. With 16-bit inputs, p is rounded to the input dtype for p @ v (tensor
cores), as FlashAttention and cuDNN do. A row whose keys are all masked gives 0, as
F.scaled_dot_product_attention does on the CPU.
Elsewhere (more than MAX_ROWS folded rows, as in a prefill; head dims over MAX_HEAD_DIM; GPUs before
Ampere; CPU tensors unless Triton's interpreter is on, TRITON_INTERPRET=1 from before triton is
imported, as tests/conftest.py does) the op is grouped_query_attention.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


from fxtp.rank_ops.grouped_query import grouped_query_attention
from fxtp.kernels.dependent_launch import uses_pdl
from fxtp.kernels.launches import count_launch
from fxtp.kernels.triton_device import runs_triton_kernels

MAX_ROWS = 16  # query rows of one kv-head group; also tl.dot's smallest M
MAX_HEAD_DIM = 256
BLOCK_KEYS = 64
# the split rule (`split_keys`), fit to split counts timed on H100 at batch 1 to 64 over 256 to 8192
# keys (benchmarks/results/decode_step_history.md): about one program per SM, none with too few keys.
# TARGET_PROGRAMS is H100's and H200's (132 SMs); other GPUs get theirs from their SM count
# (`target_programs`), where the Triton interpreter (no SMs) keeps this one
TARGET_PROGRAMS = 128
SHORT_SPLITS = 4
KEYS_PER_SPLIT = 128
MAX_SPLITS = 16
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_ARRIVALS: dict[tuple, torch.Tensor] = {}


# a flexible layout (the kernel reads any strides): with inductor's default for custom ops, exact
# strides, every layer's op would get a copy of the mask all layers read, computed in kernels of its own
@torch.library.custom_op("fxtp::decode_attention", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """`grouped_query_attention(query, key, value, attn_mask, scale)`: query [b, hq, s, d], key and
    value [b, hkv, 1, L, d], attn_mask broadcastable to [b, hq, s, L] (bool: True attends; float:
    added to the scores); [b, hq, s, d] in query's dtype. One Triton kernel where it applies."""
    if not _kernel_applies(query, key, value, attn_mask):
        return grouped_query_attention(query, key, value, attn_mask, scale)
    return launch(query, key, value, attn_mask, scale)


@decode_attention.register_fake
def _(query, key, value, attn_mask=None, scale=None):
    return query.new_empty(query.shape)


def _kernel_applies(query, key, value, attn_mask) -> bool:
    if not runs_triton_kernels(query.device):
        return False
    if key.dim() != 5 or key.size(2) != 1 or value.shape != key.shape or query.dim() != 4:
        return False
    heads, rows, dim = query.size(1), query.size(2), query.size(3)
    groups, length = key.size(1), key.size(3)
    return (heads % groups == 0 and heads // groups * rows <= MAX_ROWS and key.size(4) == dim <= MAX_HEAD_DIM
            and length > 0 and query.dtype in DTYPES and key.dtype == value.dtype == query.dtype
            and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))


def split_keys(length: int, programs: int, target: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(keys per split, a multiple of BLOCK_KEYS; splits) for `programs` (batch * kv heads) over a cache
    of `length` keys: enough splits to bring the programs to `target`, but beyond SHORT_SPLITS
    none shorter than KEYS_PER_SPLIT, and at most MAX_SPLITS; none empty."""
    wanted = min(-(-target // programs), max(SHORT_SPLITS, length // KEYS_PER_SPLIT), MAX_SPLITS)
    return chunk_keys(length, wanted)


@functools.lru_cache(maxsize=None)
def target_programs(device: torch.device) -> int:
    """split_keys's target on `device`: the largest power of two of at most its SM count (a GPU's
    property, not its name), TARGET_PROGRAMS where it has none (the Triton interpreter on a CPU)."""
    if device.type != "cuda":
        return TARGET_PROGRAMS
    return 1 << (torch.cuda.get_device_properties(device).multi_processor_count.bit_length() - 1)


def chunk_keys(length: int, splits: int) -> tuple[int, int]:
    """(keys per split, splits): `length` keys in at most `splits` chunks of whole BLOCK_KEYS blocks."""
    chunk = -(-(-(-length // splits)) // BLOCK_KEYS) * BLOCK_KEYS
    return chunk, -(-length // chunk)


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """Per-group arrival counters, all 0 between calls (the kernel's last program resets its own)."""
    key = (device, count)
    if key not in _ARRIVALS:
        _ARRIVALS[key] = torch.zeros(count, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def launch(query, key, value, attn_mask, scale, splits: Optional[int] = None) -> torch.Tensor:
    """Run the kernel on shapes `_kernel_applies` accepts, over `split_keys`'s splits, or at most
    `splits` (benchmarks/attention_latency.py times other split counts)."""
    batch, heads, rows, dim = query.shape
    groups, length = key.size(1), key.size(3)
    block_dim = max(16, 1 << (dim - 1).bit_length())  # a power of two, and tl.dot's smallest K
    programs = batch * groups
    chunk, splits = split_keys(length, programs, target_programs(query.device)) if splits is None \
        else chunk_keys(length, splits)
    out = query.new_empty(query.shape)
    if attn_mask is None:
        mask, mask_kind, mask_strides = query, "none", (0, 0, 0, 0)  # query only stands in for the pointer
    else:
        mask = attn_mask.expand(batch, heads, rows, length)
        mask_kind, mask_strides = ("bool" if mask.dtype == torch.bool else "additive"), mask.stride()
    if splits > 1:
        partial_sums = torch.empty(programs, splits, MAX_ROWS, block_dim, dtype=torch.float32, device=query.device)
        partial_stats = torch.empty(programs, splits, 2, MAX_ROWS, dtype=torch.float32, device=query.device)
        arrivals = arrival_counters(query.device, programs)
    else:
        partial_sums = partial_stats = arrivals = out  # not read with one split
    kernel, dot_types = _kernel()
    pdl = uses_pdl(query.device)
    count_launch("decode_attention")
    kernel[(programs, splits)](
        query, key, value, mask, out, partial_sums, partial_stats, arrivals,
        *query.stride(), *_without_dim_2(key.stride()), *_without_dim_2(value.stride()), *mask_strides,
        groups, heads // groups, rows, length, dim, chunk, dim ** -0.5 if scale is None else scale,
        MASK=mask_kind, SPLITS=splits, ROWS=MAX_ROWS, BLOCK_KEYS=BLOCK_KEYS, BLOCK_DIM=block_dim,
        DOT=dot_types[query.dtype], PDL=pdl, num_warps=4, launch_pdl=pdl)
    return out


def _without_dim_2(strides: tuple) -> tuple:
    return strides[:2] + strides[3:]


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
            q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, partial_sums, partial_stats, arrivals,
            q_batch, q_head, q_row, q_dim, k_batch, k_head, k_key, k_dim, v_batch, v_head, v_key, v_dim,
            mask_batch, mask_head, mask_row, mask_key,
            groups, repeats, rows, length, dim, chunk, scale,
            MASK: tl.constexpr, SPLITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_KEYS: tl.constexpr,
            BLOCK_DIM: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # fxtp/kernels/dependent_launch.py: the next kernel (the o projection's GEMV) may prefetch its weights meanwhile
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        program = tl.program_id(0)  # batch * groups + group
        split = tl.program_id(1)
        batch, group = program // groups, program % groups
        row = tl.arange(0, ROWS)  # folded: row r is query row r % rows of head group * repeats + r // rows
        head = group * repeats + row // rows
        position = row % rows
        real_row = row < repeats * rows
        channel = tl.arange(0, BLOCK_DIM)
        real_channel = channel < dim
        q = tl.load(q_ptr + batch * q_batch + head[:, None] * q_head + position[:, None] * q_row
                    + channel[None, :] * q_dim, mask=real_row[:, None] & real_channel[None, :], other=0).to(DOT)
        k_base = k_ptr + batch * k_batch + group * k_head
        v_base = v_ptr + batch * v_batch + group * v_head
        mask_base = mask_ptr + batch * mask_batch + head[:, None] * mask_head + position[:, None] * mask_row

        row_max = tl.full([ROWS], float("-inf"), tl.float32)
        row_sum = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_DIM], tl.float32)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        for first in range(start, end, BLOCK_KEYS):
            keys = first + tl.arange(0, BLOCK_KEYS)
            real_key = keys < end
            k = tl.load(k_base + keys[:, None] * k_key + channel[None, :] * k_dim,
                        mask=real_key[:, None] & real_channel[None, :], other=0)
            scores = tl.dot(q, tl.trans(k.to(DOT)), input_precision="ieee") * scale
            attends = real_row[:, None] & real_key[None, :]
            if MASK == "bool":
                attends = attends & (tl.load(mask_base + keys[None, :] * mask_key, mask=attends, other=0) != 0)
            elif MASK == "additive":
                scores += tl.load(mask_base + keys[None, :] * mask_key, mask=attends, other=0).to(tl.float32)
            scores = tl.where(attends, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows masked so far: exp(-inf) = 0, not NaN
            p = tl.exp(scores - shift[:, None])
            rescale = tl.exp(row_max - shift)
            v = tl.load(v_base + keys[:, None] * v_key + channel[None, :] * v_dim,
                        mask=real_key[:, None] & real_channel[None, :], other=0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype).to(DOT), v.to(DOT), input_precision="ieee")
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            row_max = new_max

        out_rows = out_ptr + ((batch * groups * repeats + head[:, None]) * rows + position[:, None]) * dim \
            + channel[None, :]
        stored = real_row[:, None] & real_channel[None, :]
        if SPLITS == 1:
            divisor = tl.where(row_sum > 0, row_sum, 1.0)  # a row with every key masked: acc is 0, and so is it
            tl.store(out_rows, (acc / divisor[:, None]).to(out_ptr.dtype.element_ty), mask=stored)
        else:
            sums_at = partial_sums + (program * SPLITS * ROWS + row[:, None]) * BLOCK_DIM + channel[None, :]
            stats_at = partial_stats + program * SPLITS * 2 * ROWS + row
            tl.store(sums_at + split * ROWS * BLOCK_DIM, acc)
            tl.store(stats_at + split * 2 * ROWS, row_max)
            tl.store(stats_at + split * 2 * ROWS + ROWS, row_sum)
            tl.debug_barrier()  # every thread's partial is written before the (acq_rel) arrival below
            if tl.atomic_add(arrivals + program, 1) == SPLITS - 1:  # the last of the group merges
                tl.store(arrivals + program, 0)
                row_max = tl.full([ROWS], float("-inf"), tl.float32)
                row_sum = tl.zeros([ROWS], tl.float32)
                acc = tl.zeros([ROWS, BLOCK_DIM], tl.float32)
                for other in range(SPLITS):
                    their_max = tl.load(stats_at + other * 2 * ROWS, cache_modifier=".cg")
                    their_sum = tl.load(stats_at + other * 2 * ROWS + ROWS, cache_modifier=".cg")
                    their_acc = tl.load(sums_at + other * ROWS * BLOCK_DIM, cache_modifier=".cg")
                    new_max = tl.maximum(row_max, their_max)
                    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                    mine, theirs = tl.exp(row_max - shift), tl.exp(their_max - shift)
                    acc = acc * mine[:, None] + their_acc * theirs[:, None]
                    row_sum = row_sum * mine + their_sum * theirs
                    row_max = new_max
                divisor = tl.where(row_sum > 0, row_sum, 1.0)
                tl.store(out_rows, (acc / divisor[:, None]).to(out_ptr.dtype.element_ty), mask=stored)

    # Triton 3.9's interpreter multiplies bfloat16 tiles as the integers that hold them: there dots get
    # float32 tiles of the same values (exact products, float32 sums, as on tensor cores)
    interpreted = triton.knobs.runtime.interpret
    dot_types = {torch.float32: tl.float32, torch.float16: tl.float16,
                 torch.bfloat16: tl.float32 if interpreted else tl.bfloat16}
    return decode_attention_kernel, dot_types
