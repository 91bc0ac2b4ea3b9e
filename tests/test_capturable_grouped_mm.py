"""fxtp/kernels/grouped_mm_by_rows.py: the decode step's stand-in for transformers' grouped_mm_fallback
computes what it does, by row and by expert, eagerly and compiled, without reading a tensor on the
host; the decode step of an MoE model calls it, and compiled it gives the rank graph's logits."""
import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from transformers.integrations import moe  # noqa: F401  registers torch.ops.transformers.grouped_mm_fallback

import fxtp
from fxtp.kernels.grouped_mm_by_rows import grouped_mm_by_rows
from fxtp.passes.decode.retarget import with_capturable_grouped_mm
from fxtp.testing import tiny_program
from fxtp.tiny_configs import tiny_model
from fxtp.decode import decode_graph
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve

fallback = torch.ops.transformers.grouped_mm_fallback.default


def grouped_case(group_rows: list[int], unrouted: int, dtype: torch.dtype, seed: int = 0):
    """input[S, 8], weight[E, 8, 6], offs: E experts with group_rows[e] rows each, then `unrouted` rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = sum(group_rows) + unrouted
    input = torch.randn(rows, 8, generator=generator).to(dtype)
    weight = torch.randn(len(group_rows), 8, 6, generator=generator).to(dtype)
    offs = torch.tensor(group_rows, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return input, weight, offs


@settings(max_examples=40, deadline=None)
@given(group_rows=st.lists(st.integers(0, 4), min_size=1, max_size=6), unrouted=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.float16]))
# the tiny Mixtral's decode step (4 experts, 2 a token) in float16, whose fallback the compiled step refused
# on GPUs: batch 1 by row (the form that now sums in float32), batch 3 by expert
@example(group_rows=[1, 0, 1, 0], unrouted=0, dtype=torch.float16)
@example(group_rows=[2, 1, 0, 3], unrouted=0, dtype=torch.float16)
def test_grouped_mm_by_rows_equals_the_fallback(group_rows, unrouted, dtype):
    """Empty groups, rows past the last offset, fewer and more rows than experts (both forms)."""
    case = grouped_case(group_rows, unrouted, dtype)
    expected = fallback(*case)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(grouped_mm_by_rows(*case), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.slow  # by default the decode step below compiles the stand-in within Mixtral's step
@pytest.mark.parametrize("group_rows", [[1, 0, 1, 0], [3, 1, 0, 2]], ids=["by_row", "by_expert"])
def test_grouped_mm_by_rows_compiles_to_the_same_product(group_rows):
    case = grouped_case(group_rows, unrouted=1, dtype=torch.float32)
    compiled = torch.compile(grouped_mm_by_rows, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*case), fallback(*case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 9], ids=["by_row", "by_expert"])
def test_grouped_mm_by_rows_reads_nothing_on_the_host(rows):
    """Meta tensors have no values: a function that reads one on the host (as the fallback's
    offs.tolist(), which a CUDA graph capture refuses) fails on them."""
    input, weight, offs = (torch.empty(rows, 8, device="meta"), torch.empty(4, 8, 6, device="meta"),
                           torch.empty(4, dtype=torch.int32, device="meta"))
    assert grouped_mm_by_rows(input, weight, offs).shape == (rows, 6)
    with pytest.raises(NotImplementedError, match="no data"):
        offs.tolist()


def decode_step(model, monkeypatch) -> tuple:
    """The rank graph of `model` at world size 1 with a cache, and the step DecodeGraph compiles
    from it with the default options (its compilation intercepted: nothing runs on a GPU)."""
    compiled = []
    with monkeypatch.context() as patch:
        patch.setattr(decode_graph, "compile_graph", lambda module, **kwargs: compiled.append(module))
        module = fxtp.compile(model, 1).with_cache(batch_size=1, max_length=16).rank_graph(0)
        DecodeGraph(module, resolve(DecodeOptions(), 1, False))
    return module, compiled[-1]


def test_the_decode_step_of_fp32_experts_calls_the_stand_in_and_compiles_to_the_same_logits(monkeypatch):
    module, step = decode_step(tiny_model("mixtral"), monkeypatch)
    assert any(node.target is fallback for node in module.graph.nodes)
    targets = [node.target for node in step.graph.nodes]
    assert fallback not in targets and targets.count(grouped_mm_by_rows) == 4  # 2 layers x (gate|up, down)
    args = (torch.tensor([[5]]), torch.ones(1, 16, dtype=torch.long), torch.tensor([[3]]), torch.tensor([3]))
    compiled = torch.compile(step, fullgraph=True, dynamic=False)  # tuning is for GPUs
    torch.testing.assert_close(compiled(*args), module(*args), atol=1e-5, rtol=1e-5)


def test_a_step_without_the_fallback_is_left_as_it_is():
    module = tiny_program("llama", 1)[1].rank_graph(0)
    assert with_capturable_grouped_mm(module) is module
