"""Attention over grouped key/value heads without repeating them: the op that
passes/codegen/fold_grouped_query.py puts in rank graphs in place of HF's repeat_kv + SDPA.

The n query heads of a group become n times as many query rows of one head: the same scores and
softmax rows, but attention reads the KV cache in place instead of a copy n times as large. That
pays for a few query rows (decode). A long prompt's mask, [s, cache length] per row, would be copied
n times for the folded rows, far more than the copy of k and v it saves; there k and v are repeated,
as HF does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

FOLDED_ROWS = 16  # the most query rows a call folds: a decode step's, or a few speculated tokens'


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attn_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """`scaled_dot_product_attention(query, k, v, attn_mask, scale=scale)` with k and v the
    [b, hkv, 1, l, d] `key` and `value` repeated to query's hq heads (head h reads kv head
    h // (hq / hkv)), computed on the hkv heads with hq / hkv times as many query rows (for up to
    FOLDED_ROWS rows; more are computed over k and v repeated)."""
    heads, groups = query.size(1), key.size(1)
    repeats = heads // groups
    mask_heads = attn_mask.size(1) if attn_mask is not None and attn_mask.dim() == 4 else None
    if key.size(2) != 1 or heads != groups * repeats or (attn_mask is not None and mask_heads not in (1, heads)) \
            or query.size(2) > FOLDED_ROWS:
        k, v = (t.expand(-1, -1, repeats, -1, -1).flatten(1, 2) for t in (key, value))
        return F.scaled_dot_product_attention(query, k, v, attn_mask, scale=scale)
    rows = query.size(2)
    folded = query.unflatten(1, (groups, repeats)).flatten(2, 3)  # [b, hkv, n * s, d]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(-1, -1, rows, -1)  # a row broadcast to every query row becomes rows
        per_group = attn_mask.unflatten(1, (groups, repeats)) if mask_heads == heads > 1 \
            else attn_mask.unsqueeze(2).expand(-1, -1, repeats, -1, -1)
        attn_mask = per_group.flatten(2, 3)
    out = F.scaled_dot_product_attention(folded, key.squeeze(2), value.squeeze(2), attn_mask, scale=scale)
    return out.unflatten(2, (repeats, rows)).flatten(1, 2)
