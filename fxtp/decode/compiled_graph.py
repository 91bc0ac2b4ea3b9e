"""torch.compile for a rank's GraphModule, layer by layer, whose calls raise the error the step itself raised.

The step is compiled region by region (fxtp/decode/layer_regions.py), so a 32-layer model compiles
its repeated layer once.

When code a compiled GraphModule runs raises (a custom op; a CUDA graph capture that refuses a host
sync), torch.fx's GraphModule walks the error's traceback with a generator while dynamo's frame
hook is still set. Dynamo refuses to trace a generator, and the caller gets `Unsupported: Attempt to
trace generator` with the step's own error only as its context (torch 2.11 and 2.13), which hides
what to fix. The call here raises that error instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from fxtp.decode.layer_regions import compile_by_layer

DYNAMO_GENERATOR_ERROR = "Attempt to trace generator"


def compile_graph(module: fx.GraphModule, **options) -> Callable[..., torch.Tensor]:
    """`module` compiled by layer regions, each with `torch.compile(region, **options)`; where dynamo's
    generator error hides the error a call's step raised, the call raises that error. The call's
    `regions` is (regions, compiled kinds of them)."""
    compiled = compile_by_layer(module, lambda region: torch.compile(region, **options))

    def call(*args: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(*args)
        except torch._dynamo.exc.Unsupported as error:
            if DYNAMO_GENERATOR_ERROR not in str(error) or error.__context__ is None:
                raise
            raise error.__context__ from None

    call.regions = (compiled.regions, compiled.compiled_regions)
    return call
