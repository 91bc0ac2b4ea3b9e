"""Functions rank graphs call in place of ATen ops that the target device does not implement for
the dtypes the capture picked.

transformers' MoE code counts tokens per expert with `histc`, on ints when it runs off the CPU
(CUDA implements only that) and on floats on the CPU (which implements only that); a model
captured on meta therefore holds the int form, which a CPU rank cannot run.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def histc_any_dtype(x: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:
    """aten.histc on any dtype: integer input is counted as float (exact for counts below 2**24)
    and the counts returned in the input's dtype, as histc does."""
    if x.is_floating_point():
        return aten.histc.default(x, bins, min, max)
    return aten.histc.default(x.float(), bins, min, max).to(x.dtype)


def stand_in(target, device: torch.device):
    """The function a rank graph on `device` calls for `target`."""
    if target is aten.histc.default and device.type != "cuda":
        return histc_any_dtype
    return target
