"""A prompt's attention over the static KV cache, causal where its mask says so.

A prefill's step attends the prompt's s queries to the whole cache (L >= s keys) through HF's mask,
so SDPA gets a mask and computes every one of the s x L scores: twice the work of causal attention,
in a kernel slower than the causal ones. Yet a fresh prompt without padding has a plain causal mask:
query i reads keys 0..i, and no query reads the cache beyond the prompt. Where the mask says exactly
that, `fxtp::prompt_attention` attends over the first s keys with `is_causal=True` (flash attention
on GPUs, which skips the masked half); the result is the same as over the mask. Any other mask
(padding, a sliding window, a prompt after cached tokens, a prefix read both ways) keeps the masked
attention. Only the mask's values can tell, so each call checks them on the device and waits for the
answer (one bool per layer), which a prefill's static shapes and lack of CUDA graph allow.
passes/decode/retarget.py's `with_prompt_attention` puts this op in the compiled prefill in place of
`grouped_query_attention`; the decode step, of one query row, keeps fxtp::decode_attention.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxtp.rank_ops.grouped_query import FOLDED_ROWS, grouped_query_attention


@torch.library.custom_op("fxtp::prompt_attention", mutates_args=())
def prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """`grouped_query_attention(query, key, value, attn_mask, scale)` (query [b, hq, s, d], key and value
    [b, hkv, 1, L, d]), computed as causal attention over the first s keys where `attn_mask` is
    the plain causal mask of s queries over L keys; contiguous [b, hq, s, d]."""
    rows = query.size(2)
    if rows > FOLDED_ROWS and rows <= key.size(3) and attn_mask is not None and plain_causal(attn_mask, rows):
        repeats = query.size(1) // key.size(1)
        k, v = (t[:, :, :, :rows].expand(-1, -1, repeats, -1, -1).flatten(1, 2) for t in (key, value))
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
    else:
        out = grouped_query_attention(query, key, value, attn_mask, scale)
    return out.contiguous()


@prompt_attention.register_fake
def _(query, key, value, attn_mask=None, scale=None):
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def plain_causal(attn_mask: torch.Tensor, rows: int) -> bool:
    """Whether the boolean `attn_mask` (broadcastable to [b, h, rows, L]) lets query row i read
    exactly keys 0..i, in every batch row and head."""
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.size(-2) != rows:
        return False
    causal = torch.ones(rows, rows, dtype=torch.bool, device=attn_mask.device).tril_()
    prompt, beyond = attn_mask[..., :rows], attn_mask[..., rows:]
    return bool(((prompt == causal).all() & ~beyond.any()).item())
