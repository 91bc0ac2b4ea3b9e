"""fxtp::prompt_attention (fxtp/rank_ops/prompt_attention.py): a prompt's attention over the KV cache,
causal over the prompt's keys where the mask is the plain causal one, the mask's attention elsewhere.
Both must equal grouped_query_attention; the causal path must be the one a fresh unpadded prompt takes,
and the compiled prefill must call the op."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxtp.rank_ops.prompt_attention as prompt
from fxtp.rank_ops.grouped_query import grouped_query_attention

BATCH, HEADS, GROUPS, DIM, LENGTH = 2, 4, 2, 8, 48


def _attention_inputs(rows: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, HEADS, rows, DIM, generator=generator)
    key, value = (torch.randn(BATCH, GROUPS, 1, LENGTH, DIM, generator=generator) for _ in range(2))
    return query, key, value


def _mask(rows: int, start: int = 0, padding: int = 0, window: int = 0) -> torch.Tensor:
    """HF's boolean mask of `rows` queries at positions start.. over LENGTH keys: causal, with the
    first `padding` keys of batch row 0 masked (left padding) and, given a window, only the last
    `window` keys before each query."""
    positions = torch.arange(start, start + rows)[:, None]
    keys = torch.arange(LENGTH)[None, :]
    allowed = keys <= positions
    if window:
        allowed &= keys > positions - window
    mask = allowed.expand(BATCH, 1, rows, LENGTH).clone()
    mask[0, :, :, :padding] = False
    return mask


@pytest.fixture
def causal_calls(monkeypatch):
    """The is_causal flag of every scaled_dot_product_attention call."""
    flags = []
    sdpa = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        flags.append(kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return flags


@pytest.mark.parametrize("rows", [17, 40, LENGTH])
def test_a_fresh_unpadded_prompt_is_attended_causally_with_the_same_result(causal_calls, rows):
    args = (*_attention_inputs(rows), _mask(rows))
    expected = grouped_query_attention(*args, scale=0.3)
    causal_calls.clear()
    out = torch.ops.fxtp.prompt_attention(*args, scale=0.3)
    assert causal_calls == [True]
    assert out.is_contiguous() and out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", [
    pytest.param(dict(padding=5), id="left padding"),
    pytest.param(dict(window=7), id="sliding window"),
    pytest.param(dict(start=3), id="after cached tokens"),
])
def test_any_other_mask_keeps_the_masked_attention(causal_calls, mask):
    rows = 24
    args = (*_attention_inputs(rows), _mask(rows, **mask))
    expected = grouped_query_attention(*args)
    causal_calls.clear()
    out = torch.ops.fxtp.prompt_attention(*args)
    assert causal_calls == [False]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_key_beyond_the_prompt_left_readable_is_not_causal():
    mask = _mask(20)
    assert prompt.plain_causal(mask, 20)
    mask[1, 0, 3, 30] = True  # one query of one batch row reads a cache slot past the prompt
    assert not prompt.plain_causal(mask, 20)
    assert not prompt.plain_causal(mask.float(), 20)  # an additive float mask is never taken for causal


def test_a_per_head_mask_must_be_causal_in_every_head():
    mask = _mask(20).expand(BATCH, HEADS, 20, LENGTH).clone()
    assert prompt.plain_causal(mask, 20)
    mask[0, 2, 5, 1] = False
    assert not prompt.plain_causal(mask, 20)


def test_few_rows_and_no_mask_go_to_grouped_query_attention(causal_calls):
    for rows, mask in ((4, _mask(4)), (24, None)):
        args = (*_attention_inputs(rows), mask)
        torch.testing.assert_close(torch.ops.fxtp.prompt_attention(*args), grouped_query_attention(*args))
    assert True not in causal_calls


def test_opcheck():
    for rows, mask in ((24, _mask(24)), (24, _mask(24, padding=2)), (4, None)):
        torch.library.opcheck(torch.ops.fxtp.prompt_attention.default, (*_attention_inputs(rows), mask),
                              {"scale": 0.5})


def test_the_prefill_compiled_calls_prompt_attention_and_computes_the_step(causal_calls, monkeypatch):
    """PrefillGraph compiles the rank graph with prompt_attention in place of grouped_query_attention
    (dynamo and AOT autograd tracing the op at a dynamic prompt length through its fake; alike layers
    share one compiled region): a fresh
    prompt of 20 tokens then takes the causal path in each layer, and the logits and the KV cache
    are the rank graph's own."""
    from fxtp.decode.options import DecodeOptions, resolve
    from fxtp.decode.prefill_graph import PrefillGraph
    from tests.test_layer_regions import cached_program

    compile_ = torch.compile
    regions = []
    monkeypatch.setattr(torch, "compile", lambda region, **kwargs: regions.append(region) or compile_(
        region, backend="aot_eager", dynamic=True, fullgraph=True))
    program = cached_program("llama", 1)
    module, reference = program.rank_graph(0), program.rank_graph(0)
    prefill = PrefillGraph(module, resolve(DecodeOptions(), 1, True))
    targets = [node.target for region in regions for node in region.graph.nodes]
    layers = [node.target for node in module.graph.nodes].count(grouped_query_attention)
    assert torch.ops.fxtp.prompt_attention.default in targets and grouped_query_attention not in targets
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.ones(2, 32, dtype=torch.long), torch.arange(20).expand(2, 20), torch.arange(20))
    causal_calls.clear()  # the capture's trace of HF's attention
    with torch.no_grad():
        got = prefill(*args)
        flags, causal_calls[:] = list(causal_calls), []
        want = reference(*args)
    assert flags == [True] * layers and causal_calls == [False] * layers
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, cache), (_, expected) in zip(module.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(cache, expected, rtol=1e-5, atol=1e-5, msg=name)
