"""A rank's decode step compiled by inductor and replayed as one CUDA graph (`compile=True`).

The step is rewritten for the GPU first (passes/decode/: fxtp's kernels and fusions, as the
options of fxtp/decode/options.py turn them on), then compiled layer by layer
(fxtp/decode/layer_regions.py), then captured with `torch.cuda.graph` for each new set of input
shapes. At batch 1 a step is hundreds of kernels of a
few microseconds each, so what decides its time is what runs between them: a replay runs the whole
step with no Python, no guards and no CUDA-graph-tree bookkeeping per token (`mode="reduce-overhead"`
would add those), and it does not depend on whether the installed torch's CUDA-graph trees accept
symmetric memory's peer-to-peer buffers (pytorch#175120 changed that in 2026).

MoE experts outside bfloat16 call transformers' `grouped_mm_fallback`, which reads its offsets on
the host, a sync that a capture refuses; the step calls fxtp/kernels/grouped_mm_by_rows.py's stand-in
instead. Each captured graph keeps its own memory pool; inductor's symmetric-memory buffers (at
most 128 KB per all_reduce) stay allocated for the life of the process.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional

import torch
import torch.fx as fx

from fxtp.decode.compiled_graph import compile_graph
from fxtp.progress import stage
from fxtp.decode.options import DecodeOptions
from fxtp.kernels.dependent_launch import launching_with_pdl
from fxtp.kernels.gemv import block_table, launching_with_blocks
from fxtp.passes.decode.fuse_add_rms_norm import fuse_add_rms_norm
from fxtp.passes.decode.fuse_gated_gemv import fuse_gated_gemv
from fxtp.passes.decode.fuse_gemv_push import fuse_gemv_push
from fxtp.passes.decode.fuse_rotary_gemv import fuse_rotary_gemv
from fxtp.passes.decode.merge_projections import merge_projections
from fxtp.passes.decode.retarget import (with_capturable_grouped_mm, with_decode_attention, with_gemv,
                                         with_push_all_reduce)
from fxtp.passes.decode.shared_state_copy import twin

WARMUP_STEPS = 2  # compiles, then runs once more so NCCL and symmetric-memory buffers exist before capture


class StepRewrite(NamedTuple):
    option: Optional[str]  # the DecodeOptions field that turns it on; None: always
    rewrite: Callable[[fx.GraphModule, int], fx.GraphModule]  # (step, GEMV prefetch bytes) -> a new step


# In this order: merging comes first, since the rotary and gated GEMVs fuse merged projections; push
# all_reduce comes before what fuses into it (the norm after it, then the projection before it,
# whichever push op the norm left); every fusion of a projection matches `aten.linear`, so the
# projections left over become fxtp's GEMV last. Each rewrite leaves the step it is given as it was.
STEP_REWRITES = (
    StepRewrite(None, lambda step, prefetch: with_capturable_grouped_mm(step)),  # a capture refuses the fallback
    StepRewrite("merge_projections", lambda step, prefetch: merge_projections(twin(step, "Merged"))),
    StepRewrite("push_all_reduce", lambda step, prefetch: with_push_all_reduce(step)),
    StepRewrite("push_norm", lambda step, prefetch: fuse_add_rms_norm(twin(step, "PushNorm"))),
    StepRewrite("gemv_push", lambda step, prefetch: fuse_gemv_push(twin(step, "GemvPush"), prefetch)),
    StepRewrite("decode_attention", lambda step, prefetch: with_decode_attention(step)),
    StepRewrite("rotary_gemv", lambda step, prefetch: fuse_rotary_gemv(twin(step, "Rotary"), prefetch)),
    StepRewrite("gated_gemv", lambda step, prefetch: fuse_gated_gemv(twin(step, "Gated"), prefetch)),
    StepRewrite("gemv", lambda step, prefetch: with_gemv(step, prefetch)),
)


class DecodeGraph:
    """`module`'s step rewritten by STEP_REWRITES as `options` (resolved: fxtp/decode/options.py's
    `resolve`) turn them on, compiled once and captured as a CUDA graph for each new set of input
    shapes; a call copies its inputs into that graph's static ones and replays it. The output tensor
    is the graph's, overwritten by the next call."""

    def __init__(self, module: fx.GraphModule, options: DecodeOptions):
        inductor = options.inductor_options()  # raises on unresolved options
        step = module
        for option, rewrite in STEP_REWRITES:
            if option is None or getattr(options, option):
                step = rewrite(step, options.gemv_prefetch_bytes)
        self.options = options
        self.blocks = block_table(options.gemv_blocks)
        self.compiled = compile_graph(step, fullgraph=True, dynamic=False, options=inductor)
        self.graphs: dict[tuple, tuple] = {}  # input shapes -> (graph, static inputs, static output)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype) for a in args)
        if key not in self.graphs:
            with stage(f"compile and capture the decode step for inputs {[list(a.shape) for a in args]}"):
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
        with torch.cuda.stream(side), self.launching():
            for _ in range(WARMUP_STEPS):
                self.compiled(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread queries events while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self.launching():
            output = self.compiled(*inputs)
        return graph, inputs, output

    @contextlib.contextmanager
    def launching(self):
        """fxtp's kernels launched inside launch as the options say: PDL, the preload, GEMV blocks.
        The step runs and is captured inside, so the CUDA graph replays those launches."""
        with launching_with_pdl(self.options.pdl, self.options.gemv_preload), launching_with_blocks(self.blocks):
            yield
