"""A rank's step for prompts of any length, compiled by inductor once (`compile=True` prefills with it).

Prefill is a few hundred kernels of real work (GEMMs over the whole prompt), so eagerly it is bound
by Python and kernel launches; compiled, it is one inductor wrapper call. Prompt lengths, batch sizes
and cache lengths vary from request to request, so their dims are dynamic and there is no CUDA graph. The module compiled is
a twin of the decode step's (passes/decode/shared_state_copy.py): the same parameters and KV-cache
buffers (the prefill fills the cache that decode graph reads), compiled apart from it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from fxtp.capture.static_cache import sized_dims
from fxtp.decode.compiled_graph import compile_graph
from fxtp.decode.options import DecodeOptions
from fxtp.progress import stage
from fxtp.passes.decode.retarget import with_prompt_attention


class PrefillGraph:
    """`module` compiled with a dynamic prompt length and the decode step's inductor options less
    those of the decode step alone (`DecodeOptions.inductor_options(decode=False)`); none of fxtp's
    rewrites of the decode step, which are for one row, but attention causal where the prompt's mask
    is (passes/decode/retarget.py's `with_prompt_attention`). The KV cache's sizes are dynamic too, and
    `compiled` (a dict the caller keeps) holds the compiled layer regions for the next program of
    the same step: a cache of another batch size or length then compiles nothing new."""

    def __init__(self, module: fx.GraphModule, options: DecodeOptions, compiled: Optional[dict] = None):
        compiled = {} if compiled is None else compiled
        kinds = len(compiled)
        self.compiled = compile_graph(with_prompt_attention(module), compiled, sized_dims, fullgraph=True,
                                      dynamic=True, options=options.inductor_options(decode=False))
        self.new_kinds = len(compiled) - kinds  # compiled at the first call; 0: the earlier programs' serve
        self.called = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.called:
            return self.compiled(*args)
        what = "compile the prefill step (any prompt length and cache size)" if self.new_kinds else \
            "prefill with the step compiled for an earlier cache size"
        with stage(what):  # torch.compile compiles at the first call
            out = self.compiled(*args)
        self.called = True
        return out
