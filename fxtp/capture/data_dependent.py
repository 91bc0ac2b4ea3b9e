"""Why torch.export refused a model whose forward depends on values, not shapes, and what avoids it.

A MoE layer that loops over the experts that receive tokens (`for expert_idx in expert_hit`, with
expert_hit = nonzero(...)) runs as many iterations as the data says: torch.export cannot fix their
number, and raises GuardOnDataDependentSymNode at the loop. transformers' other experts
implementations (`grouped_mm`, `batched_mm`) run every expert at once, with no loop; a model that
can set them (`set_experts_implementation`) is captured after switching, a model that cannot (DBRX:
its DbrxExperts keeps its own loop) has no option that avoids it.
"""
from __future__ import annotations

import re

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

# torch.export names the model's line that guarded: 'File "<path>", line <n>, in <function>' then the code
_RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)')


def data_dependent_reason(model: torch.nn.Module, error: BaseException) -> str:
    """What to tell the user when `error` (from torch.export of `model`) is a guard on a data-dependent
    value, else ""."""
    if not any(isinstance(e, GuardOnDataDependentSymNode) for e in _chain(error)):
        return ""
    found = _RAISED_AT.search(str(error))
    where = f" at {found[1].rpartition('/')[2]}:{found[2]} in {found[3]}: `{found[4].strip()}`" if found else ""
    reason = (f"the model's forward loops or branches on values computed from the tokens{where}; torch.export "
              f"needs control flow and shapes that the inputs' sizes alone decide.")
    if "expert" not in (found[4] if found else ""):
        return reason
    implementation = _experts_implementation(model)
    if implementation is None:
        return (f"{reason} It is a loop over the experts that receive tokens, and {type(model).__name__} has no "
                f"option that avoids it: its experts cannot run through transformers' `grouped_mm` or "
                f"`batched_mm` (set_experts_implementation does not apply to them).")
    if implementation != "eager":
        return reason
    return (f"{reason} It is a loop over the experts that receive tokens (transformers' \"eager\" experts "
            f"implementation): call model.set_experts_implementation(\"grouped_mm\") (or \"batched_mm\") "
            f"before fxtp.compile to run every expert at once, without the loop.")


def _experts_implementation(model: torch.nn.Module):
    """The model's experts implementation where it can choose one (transformers' set_experts_implementation),
    else None."""
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        return None
    return getattr(model.config, "_experts_implementation", None) or "eager"


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
