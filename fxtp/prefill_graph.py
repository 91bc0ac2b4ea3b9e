"""A rank's step for prompts of any length, compiled by inductor once (`compile=True` prefills with it).

Prefill is a few hundred kernels of real work (GEMMs over the whole prompt), so eagerly it is bound
by Python and kernel launches; compiled, it is one inductor wrapper call. Prompt lengths vary from
request to request, so the sequence dim is dynamic and there is no CUDA graph. The module compiled is
a twin of the decode step's: the same parameters and KV-cache buffers (the prefill fills the cache
that decode graph reads) under a copy of the graph, so that dynamo keeps the two compilations apart
(it caches compiled code per code object, and the twin has its own).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from fxtp.decode_graph import AUTO_SELECT, PUSH


class PrefillGraph:
    """`module` compiled with a dynamic prompt length and the decode step's inductor options, less
    symmetric-memory and push all_reduce (a prefill's all_reduces are over the whole prompt, above
    their thresholds, and their sizes are symbolic): they stay NCCL."""

    def __init__(self, module: fx.GraphModule, options: dict):
        twin = fx.GraphModule(module, copy.deepcopy(module.graph), class_name=f"{type(module).__name__}Prefill")
        twin.eval()
        inductor = {key: value for key, value in options.items() if key not in (AUTO_SELECT, PUSH)}
        self.compiled = torch.compile(twin, fullgraph=True, dynamic=True, options=inductor)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.compiled(*args)
