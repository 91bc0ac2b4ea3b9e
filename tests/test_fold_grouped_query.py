"""Grouped-query attention without repeating k and v (passes/codegen/fold_grouped_query.py)."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxtp.rank_ops.grouped_query import grouped_query_attention
from fxtp.testing import assert_equivalent, tiny_program


def repeated(t: torch.Tensor, repeats: int) -> torch.Tensor:
    """HF's repeat_kv of a [b, hkv, 1, l, d] tensor: [b, hkv * repeats, l, d]."""
    return t.expand(-1, -1, repeats, -1, -1).flatten(1, 2)


@settings(max_examples=80, deadline=None)
@given(batch=st.integers(1, 3), groups=st.integers(1, 3), repeats=st.integers(1, 4), rows=st.one_of(st.integers(1, 5), st.integers(17, 19)),
       length=st.integers(1, 9), mask=st.sampled_from(["none", "shared", "per-head", "one-row", "bool"]),
       seed=st.integers(0, 2**16))
def test_equals_sdpa_over_repeated_heads(batch, groups, repeats, rows, length, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, dim = groups * repeats, 8
    q = torch.randn(batch, heads, rows, dim, generator=gen)
    k, v = (torch.randn(batch, groups, 1, length, dim, generator=gen) for _ in range(2))
    shape = {"none": None, "shared": (batch, 1, rows, length), "per-head": (batch, heads, rows, length),
             "one-row": (batch, 1, 1, length), "bool": (batch, 1, rows, length)}[mask]
    attn_mask = None
    if shape is not None:
        attn_mask = torch.randn(*shape, generator=gen)
        if mask == "bool":
            attn_mask = attn_mask > -0.5
            attn_mask[..., 0] = True  # every row attends somewhere, so no row is all -inf
    expected = F.scaled_dot_product_attention(q, repeated(k, repeats), repeated(v, repeats), attn_mask, scale=0.3)
    got = grouped_query_attention(q, k, v, attn_mask, scale=0.3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unexpected_shapes_fall_back_to_repeating():
    q = torch.randn(2, 4, 3, 8)
    k, v = torch.randn(2, 2, 2, 5, 8), torch.randn(2, 2, 2, 5, 8)  # already repeated: dim 2 is not 1
    mask = torch.randn(3, 5)  # a 2-D mask, broadcast over batch and heads
    expected = F.scaled_dot_product_attention(q, k.flatten(1, 2), v.flatten(1, 2), mask)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), expected)


def _attention_ops(gm) -> list:
    return [n.target for n in gm.graph.nodes
            if n.target in (grouped_query_attention, torch.ops.aten.scaled_dot_product_attention.default)]


def test_llama_rank_graphs_attend_without_repeating():
    """Tiny Llama: 4 query heads over 2 kv heads. At 1 and 2 ranks every layer's attention is
    folded and no expand of k or v is left, in the plain and the KV-cache program; same logits."""
    for world_size in (1, 2):
        model, tp = tiny_program("llama", world_size)
        for gm in (tp.rank_graph(0), tp.with_cache(2, 16).rank_graph(world_size - 1)):
            ops = _attention_ops(gm)
            assert ops == [grouped_query_attention] * 2, ops
            assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.expand.default
                        and len(n.args[1]) == 5], "a repeat of k or v is left"
        ids = torch.randint(1, 256, (3, 11), generator=torch.Generator().manual_seed(7))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        assert_equivalent(model, world_size, ids, mask, program=tp)
