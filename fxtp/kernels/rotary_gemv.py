"""A decode step's q|k|v projection, rotary embedding and KV-cache write as one Triton kernel
(`DecodeOptions.rotary_gemv`, fxtp/decode/options.py; the rotary form of fxtp/kernels/gemv.py's kernel).

At batch 1 the unfused step runs the merged q|k|v GEMV, then three latency-bound kernels before
attention: q's rotation, k's rotation with its cache write, v's cache write, a few microseconds a
layer (benchmarks/results/decode_step_history.md). Here the program that sums feature j of a head's row
also sums feature j + head_dim / 2 (the pair `rotate_half` mixes), rotates the pair with cos and
sin at the step's position, and stores q's to the output and k's and v's straight into the caches.

Numerics: the projection's sums are rounded to x's dtype, as the unfused projection's output is;
the rotation is computed in float32 and rounded once (as inductor's fused rotary kernel does), so
in 16-bit dtypes it can differ from eager PyTorch by an ulp.

Elsewhere (more than one row, other dtypes or layouts, CPU tensors without Triton's interpreter)
the op runs the unfused ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxtp.kernels.gemv import Rotary, holds_one_row, kernel_applies, launch


# a flexible layout: for a custom op's input that is not stored yet, inductor's default (exact strides)
# computes a copy at every op, which for the cos and sin all layers read is a kernel a layer
@torch.library.custom_op("fxtp::rotary_gemv", mutates_args=("key_cache", "value_cache"),
                         tags=(torch.Tag.flexible_layout,))
def rotary_gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cos: torch.Tensor,
                sin: torch.Tensor, position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                heads: int, prefetch_bytes: int = 0) -> torch.Tensor:
    """q of `unfused_rotary` (also writing k and v to the caches at `position`), contiguous; one Triton
    kernel where x holds one row."""
    if not _kernel_applies(x, weight, bias, cos, sin, position, key_cache, value_cache, heads):
        return unfused_rotary(x, weight, bias, cos, sin, position, key_cache, value_cache, heads).contiguous()
    return launch(x, weight, bias, prefetch_bytes=prefetch_bytes,
                  rotary=Rotary(cos, sin, position, key_cache, value_cache, heads))


@rotary_gemv.register_fake
def _(x, weight, bias, cos, sin, position, key_cache, value_cache, heads, prefetch_bytes=0):
    return x.new_empty(x.shape[0], heads, x.shape[1], key_cache.shape[-1])


def rotary_projection(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cos: torch.Tensor,
                      sin: torch.Tensor, position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      heads: int, prefetch_bytes: int = 0) -> torch.Tensor:
    """passes/decode/fuse_rotary_gemv.py's node: `fxtp::rotary_gemv` where x holds one row, else the unfused
    ops, which torch.compile (static shapes, as the decode step) then fuses as it did before the pass."""
    if holds_one_row(x):
        return torch.ops.fxtp.rotary_gemv(x, weight, bias, cos, sin, position, key_cache, value_cache, heads,
                                          prefetch_bytes)
    return unfused_rotary(x, weight, bias, cos, sin, position, key_cache, value_cache, heads)


def unfused_rotary(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cos: torch.Tensor,
                   sin: torch.Tensor, position: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   heads: int) -> torch.Tensor:
    """HF Llama's attention up to the cache update: project, split into heads, rotate q and k
    (`rotate_half`), write k and v to the caches at `position` (dim 2); returns rotated q [B, H, S, D]."""
    kv_heads, head_dim = key_cache.shape[1], key_cache.shape[-1]
    batch, length = x.shape[:2]
    q, k, v = (t.view(batch, length, -1, head_dim).transpose(1, 2) for t in
               F.linear(x, weight, bias).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = (t * cos + torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1) * sin for t in (q, k))
    key_cache.index_copy_(2, position, k)
    value_cache.index_copy_(2, position, v)
    return q


def _kernel_applies(x, weight, bias, cos, sin, position, key_cache, value_cache, heads) -> bool:
    """The GEMV's own conditions (fxtp/kernels/gemv.py's kernel_applies), and what its rotary form reads."""
    if not (kernel_applies(x, weight, bias) and x.dim() == 3 and key_cache.dim() == 4 and key_cache.size(0) == 1):
        return False
    kv_heads, head_dim = key_cache.shape[1], key_cache.shape[-1]
    return (head_dim % 2 == 0 and weight.size(0) == (heads + 2 * kv_heads) * head_dim
            and value_cache.shape == key_cache.shape and cos.numel() == sin.numel() == head_dim
            and position.numel() == 1 and position.dtype == torch.long and position.device == x.device
            and all(t.is_contiguous() and t.dtype == x.dtype and t.device == x.device
                    for t in (cos, sin, key_cache, value_cache)))
