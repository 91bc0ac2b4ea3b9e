"""A rank's decode step compiled by inductor and replayed as one CUDA graph (`compile=True`).

Inductor options (a `compile={...}` dict overrides them):
- `coordinate_descent_tuning`: at batch 1 inductor rewrites every matmul as a Triton reduction and
  tunes it, as gpt-fast does; with it and the graph below, Llama-3-8B on one H200 went from 6.11
  to 4.84 ms a token (README, GPU results).
- `_collective.auto_select`, on by default with more than one rank when symmetric memory works on
  this machine: all_reduces up to `_collective.one_shot_all_reduce_threshold_bytes` are lowered to
  `symm_mem.one_shot_all_reduce`, one kernel that reads the peers' buffers over NVLink, in place of
  NCCL's; larger ones stay NCCL.
- `fxtp.push_all_reduce` (fxtp's own option, not inductor's), on by default wherever
  `_collective.auto_select` is: the step's all_reduces become `fxtp::push_all_reduce`
  (fxtp/kernels/push_all_reduce.py), one kernel with no barrier between the ranks; parts above its
  MAX_BYTES go to NCCL.
- `fxtp.decode_attention` (fxtp's own, on by default): the step's `grouped_query_attention` calls
  (passes/codegen/fold_grouped_query.py) become `fxtp::decode_attention` (fxtp/kernels/decode_attention.py), one
  Triton kernel for attention with few query rows in place of cuDNN's SDPA. Exact against SDPA in
  Triton's interpreter and on H100; there, at batch 1 to 64 over 256 to 8192 keys, faster in 28
  of 29 cases measured and level in the last, most at batch 1 over long caches (README, run R).
- `fxtp.push_norm` (fxtp's own, on by default wherever `fxtp.push_all_reduce` is): each push
  all_reduce followed by the residual add and an RMSNorm also adds and normalizes in its kernel
  (passes/decode/fuse_add_rms_norm.py), so the norm is no kernel of its own. Exact in Triton's
  interpreter and in the fp32 generate test on H100; Llama-3-8B at N=2 went from 3.677 to 3.509 ms
  a token, timed in turns in one process (README, run R).
- `fxtp.merge_projections` (fxtp's own, on by default): projections that read the same input (a
  layer's q, k and v; gate and up) become one, over their weights merged into one tensor
  (passes/decode/merge_projections.py); the weights of the rank's other programs become views of it.
  Exact on the CPU and in the fp32 generate test on H100; Llama-3-8B at N=2 went from 3.713 to
  3.519 ms a token, timed in turns in one process (README, run T).
- `fxtp.store_gemv_inputs` (fxtp's own, on by default unless the options name a
  `post_grad_custom_post_pass`, whose place it takes): inductor's post-grad pass becomes
  passes/decode/store_gemv_inputs.py, which stores each GEMV's computed input before the GEMV instead of
  letting every program of the GEMV recompute it (silu(gate) * up, in the down projection). Exact
  in the fp32 generate test on H100; Llama-3-8B at N=2 went from 3.845 to 3.537 ms a token, timed
  in turns in one process (README, run T), and storing only computed inputs from 3.745 to 3.482
  (run U).
- `fxtp.gemv` (fxtp's own, on by default with more than one rank): the step's projections
  (`aten.linear`) become fxtp/kernels/gemv.py's `projection`: at one row `fxtp::gemv`, a Triton GEMV at
  fixed block sizes (fxtp/kernels/gemv.py's `block_sizes`), elsewhere F.linear as before. Inductor tunes its
  own GEMVs by timing each alone, on each rank apart, and every all_reduce waits for the slower rank:
  Llama-3-8B at N=2 took 3.206 to 3.436 ms a token over five compilations, 3.247 with this (README,
  run AA), 3.192-3.198 with its loop unrolled and gate|up's blocks (run AB), 3.165-3.176 with
  q|k|v's (runs AC-AD; block sizes tuned on H100, q|k|v's 0.2-0.7% slower on H200). Left to
  inductor on one GPU, where it was not timed. A number (of bytes) also has each GEMV prefetch that much of
  its weight into L2 while the kernel before still runs (True: none); in the step at N=2, 32 MB
  gained 0.4%, within the spread above (README, run V).
- `fxtp.gated_gemv` (fxtp's own, on by default): at one row a gated MLP's `act(gate) * up` is
  computed in its gate|up GEMV (passes/decode/fuse_gated_gemv.py; fxtp/kernels/gemv.py's gated form, its prefetch
  as `fxtp.gemv` sets it, none when that is off), so it needs no kernel of its own. Llama-style
  MLPs need `fxtp.merge_projections` for it (their gate and up are then one projection). Exact in
  Triton's interpreter and in the fp32 generate test on H100; Llama-3-8B at N=2 went from 3.452 to
  3.330 ms a token, timed in turns in one process (README, run W).
- `fxtp.rotary_gemv` (fxtp's own, on by default): at one row a layer's q|k|v projection, the rotary
  embedding of q and k and the KV-cache write of k and v are one kernel (passes/decode/fuse_rotary_gemv.py,
  fxtp/kernels/rotary_gemv.py: the rotary form of fxtp/kernels/gemv.py's GEMV, its prefetch as `fxtp.gemv` sets it),
  in place of the GEMV and three small kernels; the layers share one cos, sin and write position,
  computed once a step. HF Llama-style attention (`rotate_half` rotary over all of head_dim, Phi-3's
  form too; `index_copy_` cache writes) with `fxtp.merge_projections` on. Exact in Triton's
  interpreter and in the fp32 generate test on H100; Llama-3-8B at N=2 went from 3.313 to 3.284 ms
  a token, timed in turns in one process (README, run X).
- `fxtp.gemv_preload` (fxtp's own, on by default): launched with PDL, fxtp's GEMVs (the gated and
  rotary forms, and `fxtp.gemv`'s) load their first weights before they wait for the kernel before
  them (fxtp/kernels/gemv.py). On H100 it saved 1.3-2.6 us a GEMV after a 5 us kernel; in the step at N=2
  its effect was within the spread between variants of one process (README, run Y).
- `fxtp.gemv_push` (fxtp's own, off by default; it needs `fxtp.push_all_reduce`): each projection
  whose output only a push all_reduce reads (a layer's o and down) becomes one op with it
  (passes/decode/fuse_gemv_push.py, fxtp/kernels/gemv_push.py): at one row fxtp's GEMV writes each output into the
  peers' push buffers as it sums it, and the push kernel after it only polls and sums (and adds and
  normalizes, with `fxtp.push_norm`). The projections run on fxtp's GEMV then, whatever `fxtp.gemv`
  says; its prefetch is as `fxtp.gemv` sets it.
- `fxtp.gemv_blocks` (fxtp's own, empty by default): block sizes for fxtp's GEMVs (all forms) of
  the weight shapes it names, `{"ROWSxCOLUMNS": [BLOCK_N, BLOCK_K, num_warps]}` (fxtp/kernels/gemv.py's
  `block_table`), in place of `block_sizes`' choice; for timing block sizes inside the
  step, where they may rank otherwise than alone (benchmarks/gemv_latency.py times them alone).
- `triton.enable_pdl`: programmatic dependent launch (Hopper and later; inductor ignores it on older
  GPUs). Each kernel inductor generates is scheduled while the kernel before it is still finishing
  and waits for it in `gdc_wait`, so its launch no longer sits between the two. fxtp's own kernels
  (push all_reduce, decode attention, GEMV) do the same and release the kernel after them as soon
  as their wait is over (fxtp/kernels/dependent_launch.py); cuDNN's kernels are launched in stream order. Llama-3-8B on
  H100: 3.79 -> 3.64 ms a token at N=2 (p99 3.82 -> 4.05), 5.93 either way at N=1 (README, run N,
  before fxtp's kernels took part). Only the decode step: the prefill is compiled without it.

The step is captured with `torch.cuda.graph`, not `mode="reduce-overhead"`: its inputs are copied
into static tensors and a replay runs the whole step with no Python in between, so no guards or
CUDA-graph-tree bookkeeping run per token, and nothing depends on whether the installed torch's
CUDA-graph trees accept symmetric memory's peer-to-peer buffers (pytorch#175120 changed that in 2026).
MoE experts outside bfloat16 call transformers' `grouped_mm_fallback`, which reads its offsets on
the host; the step calls fxtp/kernels/grouped_mm_by_rows.py's stand-in instead, which a graph captures.
Each captured graph keeps its own memory pool; inductor's symmetric-memory buffers (at most
128 KB per all_reduce) stay allocated for the life of the process.
"""
from __future__ import annotations

import contextlib
import itertools
import random
import warnings
from typing import Union

import torch
import torch.distributed as dist
import torch.fx as fx

from fxtp.decode.compiled_graph import compile_graph
from fxtp.kernels.gemv import block_table, launching_with_blocks
from fxtp.passes.decode.fuse_add_rms_norm import fuse_add_rms_norm
from fxtp.passes.decode.fuse_gated_gemv import fuse_gated_gemv
from fxtp.passes.decode.fuse_gemv_push import fuse_gemv_push
from fxtp.passes.decode.fuse_rotary_gemv import fuse_rotary_gemv
from fxtp.passes.decode.merge_projections import merge_projections
from fxtp.passes.decode.retarget import (with_capturable_grouped_mm, with_decode_attention, with_gemv,
                                         with_push_all_reduce)
from fxtp.passes.decode.store_gemv_inputs import StoreGemvInputs
from fxtp.kernels.dependent_launch import launching_with_pdl
from fxtp.passes.decode.shared_state_copy import twin

WARMUP_STEPS = 2  # compiles, then runs once more so NCCL and symmetric-memory buffers exist before capture
AUTO_SELECT = "_collective.auto_select"
PUSH = "fxtp.push_all_reduce"
PUSH_NORM = "fxtp.push_norm"
PDL = "triton.enable_pdl"
ATTENTION = "fxtp.decode_attention"
MERGE = "fxtp.merge_projections"
STORE = "fxtp.store_gemv_inputs"
GEMV = "fxtp.gemv"
GATED = "fxtp.gated_gemv"
ROTARY = "fxtp.rotary_gemv"
PRELOAD = "fxtp.gemv_preload"
GEMV_PUSH = "fxtp.gemv_push"
GEMV_BLOCKS = "fxtp.gemv_blocks"
POST_GRAD = "post_grad_custom_post_pass"
# rewrites of the step, not inductor's
FXTP_OWN = (PUSH, PUSH_NORM, ATTENTION, MERGE, STORE, GEMV, GATED, ROTARY, PRELOAD, GEMV_PUSH, GEMV_BLOCKS)
DECODE_ONLY = (AUTO_SELECT, PDL, *FXTP_OWN)
_CAPTURES = itertools.count()


def inductor_options(compile: Union[bool, dict], group_name: str, world_size: int, device: torch.device) -> dict:
    """The options the decode step is compiled with: the defaults above, then the user's dict."""
    if compile is not True and not isinstance(compile, dict):
        raise TypeError(f"compile must be True, False or a dict of inductor options (and fxtp's own "
                        f"{', '.join(FXTP_OWN)}), got {compile!r}")
    if device.type != "cuda":
        raise ValueError(f"compile=True captures the decode step as a CUDA graph, but the device is {device}: "
                         "pass a CUDA device, or compile=False on the CPU")
    user = compile if isinstance(compile, dict) else {}
    symmetric = world_size > 1 and symmetric_memory_works(group_name, device)
    options = {"coordinate_descent_tuning": True, PDL: True, AUTO_SELECT: symmetric, **user}
    options.setdefault(PUSH, options[AUTO_SELECT])
    options.setdefault(ATTENTION, True)
    options.setdefault(MERGE, True)
    options.setdefault(GEMV, world_size > 1)
    if not isinstance(options[GEMV], int) or options[GEMV] < 0:  # bools are ints
        raise ValueError(f"{GEMV} is True, False or the bytes of each weight to prefetch (0 or more), "
                         f"got {options[GEMV]!r}")
    options.setdefault(GATED, True)
    options.setdefault(ROTARY, True)
    options.setdefault(PRELOAD, True)
    for key in (GATED, ROTARY, PRELOAD):
        if not isinstance(options[key], bool):
            raise ValueError(f"{key} is True or False, got {options[key]!r}")
    options.setdefault(STORE, options.get(POST_GRAD) is None)  # the user's own post-grad pass takes its place
    if options[STORE] and options.get(POST_GRAD) is not None:
        raise ValueError(f"{STORE}=True is inductor's {POST_GRAD}, which the options set already; "
                         f"leave {STORE} out (it is then off) or drop {POST_GRAD}")
    options.setdefault(PUSH_NORM, options[PUSH])
    options.setdefault(GEMV_PUSH, False)
    block_table(options.setdefault(GEMV_BLOCKS, {}))  # raises on a malformed table
    for key, fused in ((PUSH_NORM, "the norm"), (GEMV_PUSH, "the projection before it")):
        if not isinstance(options[key], bool):
            raise ValueError(f"{key} is True or False, got {options[key]!r}")
        if options[key] and not options[PUSH]:
            raise ValueError(f"{key}=True fuses {fused} into push all_reduce, which is off here ({PUSH}=False); "
                             f"turn {PUSH} on or leave {key} out")
    for key in (AUTO_SELECT, PUSH):
        if options[key] and world_size > 1 and not symmetric:
            raise RuntimeError(f"{key}=True needs symmetric memory, which does not work on this machine "
                               f"(see the warning above); leave {key} out to use NCCL")
    return options


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
    group = dist.distributed_c10d._resolve_process_group(group_name)
    flag = torch.tensor([works], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if not flag.item():
        return False
    with warnings.catch_warnings():  # deprecated in newer torch, where inductor still checks it
        warnings.simplefilter("ignore", FutureWarning)
        symm_mem.enable_symm_mem_for_group(group_name)
    return True


class DecodeGraph:
    """`module`'s step, compiled once and captured as a CUDA graph for each new set of input shapes;
    a call copies its inputs into that graph's static ones and replays it. The output tensor is the
    graph's, overwritten by the next call."""

    def __init__(self, module: fx.GraphModule, options: dict):
        inductor = {key: value for key, value in options.items() if key not in FXTP_OWN}
        if options.get(STORE):
            inductor[POST_GRAD] = StoreGemvInputs()
        step = with_capturable_grouped_mm(module)
        step = merge_projections(twin(step, "Merged")) if options.get(MERGE) else step
        gemv = options.get(GEMV, False)
        prefetch_bytes = 0 if gemv is True else int(gemv)
        if options.get(PUSH):
            step = with_push_all_reduce(step)
            if options.get(PUSH_NORM):
                step = fuse_add_rms_norm(step)
            if options.get(GEMV_PUSH):
                step = fuse_gemv_push(step, prefetch_bytes)
        step = with_decode_attention(step) if options.get(ATTENTION) else step
        if options.get(ROTARY):
            step = fuse_rotary_gemv(twin(step, "Rotary"), prefetch_bytes)
        if options.get(GATED):
            step = fuse_gated_gemv(twin(step, "Gated"), prefetch_bytes)
        if gemv is not False:
            step = with_gemv(step, prefetch_bytes)
        self.pdl, self.preload = bool(options.get(PDL)), options.get(PRELOAD, True)
        self.blocks = block_table(options.get(GEMV_BLOCKS, {}))
        self.compiled = compile_graph(step, fullgraph=True, dynamic=False, options=inductor)
        self.graphs: dict[tuple, tuple] = {}  # input shapes -> (graph, static inputs, static output)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, inputs, output = self.graphs[key]
        for static, value in zip(inputs, args):
            static.copy_(value)
        graph.replay()
        return output

    def _capture(self, args: tuple) -> tuple:
        inputs = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        user_random = random.getstate()
        # inductor names each symmetric-memory buffer by a random.randint drawn while it compiles, and
        # torch.compile restores Python's random state afterwards: without a new seed the next
        # compilation (another batch size) draws the same ids for buffers of other sizes, which fails.
        # The seed is the same on every rank, which captures its graphs in the same order.
        random.seed(f"fxtp-decode-graph-{next(_CAPTURES)}")
        try:
            with torch.cuda.stream(side), self._launching():
                for _ in range(WARMUP_STEPS):
                    self.compiled(*inputs)
        finally:
            random.setstate(user_random)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread queries events while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._launching():
            output = self.compiled(*inputs)
        return graph, inputs, output

    @contextlib.contextmanager
    def _launching(self):
        """fxtp's kernels launched inside launch as the options say: PDL, the preload, GEMV blocks."""
        with launching_with_pdl(self.pdl, self.preload), launching_with_blocks(self.blocks):
            yield
