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

from typing import Callable, Optional

import torch
import torch.fx as fx

from fxtp.decode.layer_regions import compile_by_layer

DYNAMO_GENERATOR_ERROR = "Attempt to trace generator"


def start_compile_workers() -> None:
    """Start inductor's Triton compile workers now, as its own backend does at the first compile.
    Until they are up, inductor compiles each kernel in this process, one after another
    (`AsyncCompile.use_process_pool`); started when a compiled generator is made, they come up while
    the model is exported and planned instead of during the first compilation. Inductor's own
    switches (TORCH_WARM_POOL=0, TORCHINDUCTOR_COMPILE_THREADS=1) still turn them off."""
    from torch._inductor.async_compile import maybe_warm_pool

    maybe_warm_pool()


def compile_graph(module: fx.GraphModule, compiled: Optional[dict] = None,
                  sized: Callable[[str], tuple[int, ...]] = lambda name: (), **options) -> Callable[..., torch.Tensor]:
    """`module` compiled by layer regions, each with `torch.compile(region, **options)` (`compiled`
    and `sized`: compile_by_layer's); where dynamo's generator error hides the error a call's step
    raised, the call raises that error. The call's `regions` is (regions, compiled kinds of them)."""
    step = compile_by_layer(module, lambda region: torch.compile(region, **options), compiled, sized)

    def call(*args: torch.Tensor) -> torch.Tensor:
        try:
            return step(*args)
        except torch._dynamo.exc.Unsupported as error:
            if DYNAMO_GENERATOR_ERROR not in str(error) or error.__context__ is None:
                raise
            raise error.__context__ from None

    call.regions = (step.regions, step.compiled_regions)
    return call
