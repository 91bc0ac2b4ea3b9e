"""A rank's step for prompts of any length, compiled by inductor once (`compile=True` prefills with it).

Prefill is a few hundred kernels of real work (GEMMs over the whole prompt), so eagerly it is bound
by Python and kernel launches; compiled, it is one inductor wrapper call. Prompt lengths vary from
request to request, so the sequence dim is dynamic and there is no CUDA graph. The module compiled is
a twin of the decode step's (passes/decode/shared_state_copy.py): the same parameters and KV-cache
buffers (the prefill fills the cache that decode graph reads), compiled apart from it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxtp.decode.compiled_graph import compile_graph
from fxtp.decode.options import DecodeOptions
from fxtp.progress import stage
from fxtp.passes.decode.shared_state_copy import twin


class PrefillGraph:
    """`module` compiled with a dynamic prompt length and the decode step's inductor options less
    those of the decode step alone (`DecodeOptions.inductor_options(decode=False)`); none of fxtp's
    rewrites of the decode step, which are for one row."""

    def __init__(self, module: fx.GraphModule, options: DecodeOptions):
        self.compiled = compile_graph(twin(module, "Prefill"), fullgraph=True, dynamic=True,
                                      options=options.inductor_options(decode=False))
        self.called = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.called:
            return self.compiled(*args)
        with stage("compile the prefill step (any prompt length)"):  # torch.compile compiles at the first call
            out = self.compiled(*args)
        self.called = True
        return out
