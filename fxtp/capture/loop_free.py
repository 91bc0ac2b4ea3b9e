"""Capture recurrent layers with the sequence length dynamic: transformers' reference implementations
of the recurrences (Mamba's `mamba_selective_scan`, the gated delta rule's
`torch_chunk_gated_delta_rule`; each modeling module has its own copy) loop over the sequence or its
chunks in Python, which torch.export unrolls for the example length: the graph then fits that length
only, and a longer input computes too few steps without an error. During an export, `loop_free`
puts in their place the same computations with the loop inside one op (fxtp/rank_ops/), which runs
it at call time."""
from __future__ import annotations

import inspect
import sys
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch

from fxtp.capture.delta_rule import DELTA_RULE_PARAMETERS, delta_rule_for
from fxtp.rank_ops.delta_rule import FUNCTION as DELTA_RULE_FUNCTION
from fxtp.capture.selective_scan import SCAN_FUNCTION, SCAN_PARAMETERS, selective_scan

# the one-op recurrences `loop_free` puts in a graph, which have a forward only: op -> what it computes
LOOP_OPS = {torch.ops.fxtp.selective_scan.default: "Mamba's selective scan",
            torch.ops.fxtp.chunk_gated_delta_rule.default: "the gated delta rule of linear attention"}


def _takes(function, parameters: tuple) -> bool:
    """Whether `function` takes `parameters` (through the hub-kernel wrapper `kernels` makes of it, an
    nn.Module whose forward wraps it): a copy that lacks one computes something else and is kept."""
    if isinstance(function, torch.nn.Module):
        function = function.forward
    try:
        names = inspect.signature(inspect.unwrap(function)).parameters
    except (TypeError, ValueError):
        return False
    return all(name in names for name in parameters)


@contextmanager
def _replaced(model: torch.nn.Module, name: str, parameters: tuple, replacement_for: Callable[[str], Callable]):
    """Within the context, the modeling modules of `model`'s layers that define `name` taking
    `parameters` call `replacement_for(module name)` instead."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    saved = {m: getattr(m, name) for m in modules if m is not None and _takes(getattr(m, name, None), parameters)}
    try:
        for module in saved:
            setattr(module, name, replacement_for(module.__name__))
        yield
    finally:
        for module, function in saved.items():
            setattr(module, name, function)


@contextmanager
def loop_free(model: torch.nn.Module):
    """Within the context, `model`'s layers call fxtp's one-op recurrences (see the module docstring)."""
    with ExitStack() as stack:
        stack.enter_context(_replaced(model, SCAN_FUNCTION, SCAN_PARAMETERS, lambda _: selective_scan))
        stack.enter_context(_replaced(model, DELTA_RULE_FUNCTION, DELTA_RULE_PARAMETERS, delta_rule_for))
        yield
