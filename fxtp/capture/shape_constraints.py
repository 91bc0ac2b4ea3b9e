"""What torch.export finds that a forward requires of its dynamic dims, applied where the program can
still take every length it allows, and said in words where it cannot.

fxtp exports with the batch and sequence dims dynamic: Dim.DYNAMIC hints for a HF model
(Signature.dynamic_shapes) and a plain module's token ids, named Dims where a user passes them or
a static cache's batch. A forward may constrain such a dim:
- a bound or a multiple (a table of 32 positions; a reshape into chunks of 64). Under a hint torch
  narrows the dim itself; under a named Dim it raises a constraint violation whose "Suggested fixes"
  say the narrower Dim, and `exported` exports once more with them applied (torch's
  refine_dynamic_shapes_from_suggested_fixes, in torch since 2.4): the program then takes the lengths
  the model takes.
- one value (a Python loop or list over the positions, which export unrolls for the example's
  length). A program of that one length would compute too few or too many steps for any other, so
  this is refused: `ShapeConstraintError` names the dim, the value and the model's line that fixed it,
  instead of torch's "run with TORCH_LOGS".
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Optional

import torch
from torch._dynamo.exc import UserError, UserErrorType
from torch.export.dynamic_shapes import _DimHint, refine_dynamic_shapes_from_suggested_fixes

__all__ = ["ShapeConstraintError", "exported"]

# torch's lines: "You marked <dim> as dynamic but your code specialized it to be a constant (<n>)."
_SPECIALIZED = re.compile(r"You marked (.+?) as dynamic but your code specialized it to be a constant \((-?\d+)\)")
# "Not all values of <dim> ... satisfy the generated guard <guard>." (named Dims)
_GUARD = re.compile(r"Not all values of (.+?) in the specified range .*? satisfy the generated guard (.+?)\.?$")
_SOURCE = re.compile(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]")  # export's name of an input's dim
# ShapeEnv's INFO line for each guard: "eval Eq(s70, 16) [guard added] (file.py:180 in function), ..."
_GUARD_SITE = re.compile(r"Eq\(s\d+, (-?\d+)\) \[guard added\][^(]*\(([^)]*?([\w.]+\.py:\d+) in ([\w<>]+))\)")
_SHAPE_LOG = logging.getLogger("torch.fx.experimental.symbolic_shapes")


class ShapeConstraintError(RuntimeError):
    """torch.export found that the forward fixes a dim declared dynamic to one value (the message says
    which, where, and why fxtp does not capture it), or constrains one in a way its fixes do not cover
    (the message says how); torch's error is its __cause__."""


def exported(module: torch.nn.Module, args: tuple, kwargs: Optional[dict], dynamic_shapes) -> Any:
    """torch.export.export (non-strict) of `module`; where the declared dynamic dims violate what the
    forward requires, once more with torch's suggested fixes applied (bounds, multiples). A dim the
    forward fixes to one value, or a violation with no fix torch can apply, raises ShapeConstraintError;
    every other failure is torch's own."""
    def export(shapes):
        return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes)

    try:
        return export(dynamic_shapes)
    except Exception as e:
        violation = _constraint_violation(e)
        if violation is not None and _SPECIALIZED.search(violation.msg):
            raise _in_words(violation, _guard_sites(lambda: export(dynamic_shapes)))
        refined = None if violation is None else _refined(violation.msg, dynamic_shapes)
        if refined is None:
            raise _in_words(violation, []) or e
    try:  # outside the first error's handler: this one's context is not the first violation
        return export(refined)
    except Exception as again:  # the fixes were not all: say what is left
        raise _in_words(_constraint_violation(again), []) or again


def _constraint_violation(error: BaseException) -> Optional[UserError]:
    while error is not None:
        if isinstance(error, UserError) and error.error_type is UserErrorType.CONSTRAINT_VIOLATION:
            return error
        error = error.__cause__ or error.__context__
    return None


def _refined(message: str, dynamic_shapes):
    """`dynamic_shapes` with the suggested fixes in `message` applied to its named Dims (torch's helper
    reads no Dim.DYNAMIC hint, which it cannot name: they stay), or None where it finds none to apply."""
    if "Suggested fixes:" not in message:
        return None
    named = _map_dims(dynamic_shapes, lambda dim: None if isinstance(dim, _DimHint) else dim)
    try:
        refined = refine_dynamic_shapes_from_suggested_fixes(message, named)
    except Exception:  # torch's helper asserts on fixes it cannot apply (a relation to a dim not declared)
        return None
    return _map_dims(dynamic_shapes, lambda dim, new: dim if isinstance(dim, _DimHint) else new, refined)


def _map_dims(shapes, function: Callable, *others):
    """`shapes` (torch.export's dynamic_shapes: dicts, tuples and lists of dim specs) with `function`
    applied to each dim spec and the specs at the same place in `others`."""
    if isinstance(shapes, dict):
        return {key: _map_dims(value, function, *(other[key] for other in others)) for key, value in shapes.items()}
    if isinstance(shapes, (tuple, list)):
        return type(shapes)(_map_dims(value, function, *(other[i] for other in others))
                            for i, value in enumerate(shapes))
    return function(shapes, *others)


def _readable(source: str) -> str:
    return _SOURCE.sub(r"\1.size(\2)", source)


def _in_words(violation: Optional[UserError], sites: list[tuple[int, str]]) -> Optional[ShapeConstraintError]:
    """The ShapeConstraintError that says `violation` (torch's constraint violation; None: no error) in
    words, with inputs' dims as `ids.size(1)` and the model's line that fixed a dim to one value."""
    if violation is None:
        return None
    fixed = _SPECIALIZED.findall(violation.msg)
    if fixed:
        dims: dict[int, list[str]] = {}
        for source, value in fixed:  # torch names a dim once per input that shares it
            dims.setdefault(int(value), []).append(_readable(source))
        said = []
        for value, sources in dims.items():
            where = next((site for site_value, site in sites if site_value == value), "")
            said.append(f"{' and '.join(sources)} to {value}" + (f" at {where}" if where else ""))
        error = ShapeConstraintError(
            f"its forward fixes {'; '.join(said)} (the example's size), a dim fxtp declares dynamic. Such code "
            "decides on the exact size, typically a Python loop or list over the positions, which export unrolls for "
            "the example; the program would compute too few or too many steps for every other size, so fxtp does "
            "not capture it: the model's forward must handle the size as a symbol (torch.export's dynamic shapes).")
    else:
        guards = [f"{_readable(m[1])} must satisfy {_readable(m[2])}" for line in violation.msg.splitlines()
                  if (m := _GUARD.search(line.strip()))]
        fixes = "; ".join(line.strip() for line in violation.msg.partition("Suggested fixes:")[2].strip().splitlines())
        error = ShapeConstraintError(f"its forward constrains dims that fxtp declares dynamic: {'; '.join(guards)}"
                                     + (f" (torch's suggested fixes: {fixes})" if fixes else "") + ".")
    error.__cause__ = violation
    return error


def _guard_sites(export: Callable[[], Any]) -> list[tuple[int, str]]:
    """(value, "file.py:line in function") of each guard that fixes a dim to one value while `export()`
    runs (again: it failed once), read from the INFO lines ShapeEnv logs where the forward's code adds a
    guard (what TORCH_LOGS="+dynamic" prints): the model's line that fixed a dim. Only a failed capture
    pays for them: at INFO, ShapeEnv records the user's stack of every guard."""
    sites: list[tuple[int, str]] = []

    class Record(logging.Handler):
        def emit(self, record):
            found = _GUARD_SITE.search(record.getMessage())
            if found:
                sites.append((int(found[1]), f"{found[3]} in {found[4]}"))

    handler = Record(logging.INFO)
    saved = _SHAPE_LOG.handlers, _SHAPE_LOG.level, _SHAPE_LOG.propagate
    if _SHAPE_LOG.isEnabledFor(logging.INFO):  # the user asked for these lines (TORCH_LOGS): still shown
        _SHAPE_LOG.addHandler(handler)
    else:  # torch's own handler of this logger would print them: only ours reads them
        _SHAPE_LOG.handlers, _SHAPE_LOG.propagate = [handler], False
        _SHAPE_LOG.setLevel(logging.INFO)
    try:
        export()
    except Exception:
        pass  # the same failure as the first time: only its guards' sites are wanted
    finally:
        _SHAPE_LOG.removeHandler(handler)
        _SHAPE_LOG.handlers, _SHAPE_LOG.propagate = saved[0], saved[2]
        _SHAPE_LOG.setLevel(saved[1])  # not the attribute: setLevel clears the loggers' cached levels
    return sites
