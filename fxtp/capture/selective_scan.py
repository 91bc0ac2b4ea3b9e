"""Capture Mamba layers with the sequence length dynamic: transformers' `mamba_selective_scan`
(mamba, falcon_mamba, jamba, zamba: each modeling module has its own copy) loops over the
sequence in Python when exporting, which torch.export unrolls for the example length. During an
export, `loop_free_scans` puts in its place the same computation with the loop inside one op
(fxtp.rank_ops.selective_scan)."""
from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import fxtp.rank_ops.selective_scan  # noqa: F401  (registers torch.ops.fxtp.selective_scan)

SCAN_FUNCTION = "mamba_selective_scan"
# the parameters the replacement reads; a copy that lacks one computes something else and is kept
_PARAMETERS = ("hidden_states", "dt", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state")


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_):
    """transformers' mamba_selective_scan (x, dt [batch, channels, seq], A [channels, state],
    B, C [batch, state, seq]) with its sequential path's operations, the loop in one op."""
    if return_last_state:
        raise NotImplementedError("fxtp captures Mamba layers without a cache: no recurrent state is returned")
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B, C = B.transpose(1, 2), C.transpose(1, 2)
    decay = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    increment = dt[:, :, :, None] * B[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    out = torch.ops.fxtp.selective_scan(decay, increment, C, input_dtype)
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return out


def _replaceable(function) -> bool:
    """Whether `function` takes _PARAMETERS (through the hub-kernel wrapper `kernels` makes of it, an
    nn.Module whose forward wraps it)."""
    if isinstance(function, torch.nn.Module):
        function = function.forward
    try:
        names = inspect.signature(inspect.unwrap(function)).parameters
    except (TypeError, ValueError):
        return False
    return all(name in names for name in _PARAMETERS)


@contextmanager
def loop_free_scans(model: torch.nn.Module):
    """Within the context, the modeling modules of `model`'s layers call `selective_scan` for
    their mamba_selective_scan."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    saved = {m: getattr(m, SCAN_FUNCTION) for m in modules
             if m is not None and _replaceable(getattr(m, SCAN_FUNCTION, None))}
    try:
        for module in saved:
            setattr(module, SCAN_FUNCTION, selective_scan)
        yield
    finally:
        for module, function in saved.items():
            setattr(module, SCAN_FUNCTION, function)
