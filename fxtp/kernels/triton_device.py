"""Where fxtp's Triton kernels with a fallback (decode attention, GEMV) run: GPUs from Ampere on
(Triton's bfloat16 tl.dot, which decode attention uses, needs sm80), and CPU tensors in Triton's
interpreter (TRITON_INTERPRET=1 from before triton is imported, as tests/conftest.py does)."""
from __future__ import annotations

import os

import torch

MIN_CAPABILITY = (8, 0)


def runs_triton_kernels(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
