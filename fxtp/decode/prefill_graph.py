"""A rank's step for prompts of any length, compiled by inductor once (`compile=True` prefills with it).

Prefill is a few hundred kernels of real work (GEMMs over the whole prompt), so eagerly it is bound
by Python and kernel launches; compiled, it is one inductor wrapper call. Prompt lengths vary from
request to request, so the sequence dim is dynamic and there is no CUDA graph. The module compiled is
a twin of the decode step's (passes/decode/shared_state_copy.py): the same parameters and KV-cache buffers (the prefill
fills the cache that decode graph reads), compiled apart from it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.decode.compiled_graph import compile_graph
from fxtp.decode.decode_graph import DECODE_ONLY
from fxtp.passes.decode.shared_state_copy import twin


class PrefillGraph:
    """`module` compiled with a dynamic prompt length and the decode step's inductor options, less
    symmetric-memory and push all_reduce (a prefill's all_reduces are over the whole prompt, above
    their thresholds, and their sizes are symbolic: they stay NCCL) and programmatic dependent
    launch (measured on decode steps only)."""

    def __init__(self, module: fx.GraphModule, options: dict):
        inductor = {key: value for key, value in options.items() if key not in DECODE_ONLY}
        self.compiled = compile_graph(twin(module, "Prefill"), fullgraph=True, dynamic=True, options=inductor)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.compiled(*args)
