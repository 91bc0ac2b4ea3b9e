"""The GraphModule of one rank: the rewrite (passes/codegen/rewrite.py), then the clean-ups after it.

Reads:  what rewrite_for_rank reads (node.meta["fxtp.layout"], ["fxtp.wants"], ["fxtp.state"]).
Writes: the rank's GraphModule in eval mode, as rewrite_for_rank writes it and then each of
        CLEAN_UPS in order. A clean-up matches the rank graph's own structure only, so every
        rank's graph changes the same way (fxtp/runtime/simulate.py runs them in lockstep).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

from fxtp.sharding.layouts import Layout
from fxtp.passes.codegen.fold_grouped_query import fold_grouped_query
from fxtp.passes.codegen.fuse_bias import fuse_bias
from fxtp.passes.codegen.rewrite import rewrite_for_rank

CLEAN_UPS: tuple[Callable[[fx.GraphModule], fx.GraphModule], ...] = (
    # split_bias took every bias out of its GEMM so the rules could add a row-parallel one once, after
    # the all_reduce; where a rank adds its bias to its own product, it goes back in: one kernel, not two
    fuse_bias,
    # HF's repeat_kv copies each kv head for the query heads of its group; attention reads the grouped
    # heads in place instead (no copies of the KV cache n times as large)
    fold_grouped_query,
)


def rank_graph(gm: fx.GraphModule, state: dict[str, torch.Tensor], rank: int, world_size: int,
               group_name: str, device: torch.device,
               load: Optional[Callable[[str, Layout], torch.Tensor]] = None, training: bool = False) -> fx.GraphModule:
    """rewrite_for_rank's graph (see it for `state`, `load` and `training`), cleaned up."""
    module = rewrite_for_rank(gm, state, rank, world_size, group_name, device, load, training)
    for clean_up in CLEAN_UPS:
        module = clean_up(module)
    module.eval()
    return module
