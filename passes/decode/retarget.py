"""Retargets of a decode step: twins (passes/decode/shared_state_copy.py) whose calls of one op call
fxtp's kernel for it instead. Each leaves the module it is given as it was.

Reads:  call_function nodes by target: transformers' `grouped_mm_fallback`, `grouped_query_attention`
        (fxtp/rank_ops/grouped_query.py), `aten.linear`, and sum all_reduces (`all_reduce` + `wait_tensor`).
Writes: in a twin, calls of fxtp/kernels/'s op with the same arguments:

    grouped_mm_fallback(x, w, offs)      -> grouped_mm_by_rows(x, w, offs)        (CUDA-graph capturable)
    grouped_query_attention(q, k, v, m)  -> fxtp::decode_attention(q, k, v, m)   (the decode step)
    grouped_query_attention(q, k, v, m)  -> fxtp::prompt_attention(q, k, v, m)   (the prefill)
    linear(x, w, b)                      -> gemv.projection(x, w, b, prefetch_bytes=...)
    wait_tensor(all_reduce(x, "sum", g)) -> fxtp::push_all_reduce(x, g)
"""
from __future__ import annotations

import torch
import torch.fx as fx

import fxtp.kernels.decode_attention  # noqa: F401 - registers fxtp::decode_attention, which a twin calls
import fxtp.rank_ops.prompt_attention  # noqa: F401 - registers fxtp::prompt_attention, which a twin calls
from fxtp.kernels.gemv import PREFETCH_BYTES, projection
from fxtp.kernels.grouped_mm_by_rows import grouped_mm_by_rows
from fxtp.passes.decode.shared_state_copy import retargeted, twin
from fxtp.rank_ops.grouped_query import grouped_query_attention
from fxtp.sharding.collectives import ALL_REDUCE
from fxtp.sharding.op_rules.contractions import GROUPED_MM_FALLBACK
from fxtp.sharding.op_rules.helpers import calls

aten = torch.ops.aten


def with_capturable_grouped_mm(module: fx.GraphModule) -> fx.GraphModule:
    """`module` if it calls no `grouped_mm_fallback`, else a twin of it (passes/decode/shared_state_copy.py) that calls
    `grouped_mm_by_rows` in its place. `module` is left as it was."""
    fallbacks = {node.target for node in module.graph.nodes if calls(node, (GROUPED_MM_FALLBACK,))}
    if not fallbacks:
        return module
    (fallback,) = fallbacks
    return retargeted(module, "CapturableGroupedMm", fallback, grouped_mm_by_rows)


def with_decode_attention(module: fx.GraphModule) -> fx.GraphModule:
    """A twin of `module` (passes/decode/shared_state_copy.py) whose `grouped_query_attention` calls (written by
    passes/codegen/fold_grouped_query.py) are `fxtp::decode_attention` calls with the same arguments.
    `module` is left as it was."""
    return retargeted(module, "DecodeAttention", grouped_query_attention, torch.ops.fxtp.decode_attention.default)


def with_prompt_attention(module: fx.GraphModule) -> fx.GraphModule:
    """A twin of `module` whose `grouped_query_attention` calls are `fxtp::prompt_attention` calls
    (fxtp/rank_ops/prompt_attention.py: causal attention where the mask is the plain causal one), for
    the prefill. `module` is left as it was."""
    return retargeted(module, "Prefill", grouped_query_attention, torch.ops.fxtp.prompt_attention.default)


def with_gemv(module: fx.GraphModule, prefetch_bytes: int = PREFETCH_BYTES) -> fx.GraphModule:
    """A twin of `module` (passes/decode/shared_state_copy.py) whose `aten.linear` calls are `projection` calls with the same
    arguments and `prefetch_bytes`. `module` is left as it was."""
    return retargeted(module, "Gemv", aten.linear.default, projection, prefetch_bytes=prefetch_bytes)


def with_push_all_reduce(module: fx.GraphModule) -> fx.GraphModule:
    """A twin of `module` (passes/decode/shared_state_copy.py) whose sum all_reduces (`all_reduce` + `wait_tensor`) are
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
