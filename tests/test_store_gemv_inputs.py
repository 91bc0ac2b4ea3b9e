"""passes/store_gemv_inputs.py on the aten graph inductor's own decompositions make (on the meta
device, which they treat as a GPU): which node it marks, and how the decode step hands it to inductor."""
import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

import fxtp
from fxtp.configs import tiny_model
from fxtp.decode_graph import DECODE_ONLY, POST_GRAD, STORE, DecodeGraph, inductor_options
from fxtp.passes.store_gemv_inputs import REALIZE, StoreGemvInputs

aten, prims = torch.ops.aten, torch.ops.prims


def down_projection(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def post_grad_graph(rows: int):
    tensors = (torch.randn(rows, 16, device="meta", dtype=torch.bfloat16),
               torch.randn(4, 8, device="meta", dtype=torch.bfloat16))
    with config.patch(coordinate_descent_tuning=True):
        return make_fx(down_projection, decomposition_table=select_decomp_table())(*tensors).graph


def test_a_one_row_matmuls_input_is_marked_and_nothing_else():
    """At one row inductor's decomposition makes the matmul a reduction whose input is silu(g) * u,
    cast to float32; that cast of the product is what gets stored. At two rows the matmul stays
    `mm`, a GEMM, and nothing is marked."""
    graph = post_grad_graph(rows=1)
    StoreGemvInputs()(graph)
    marked = [n for n in graph.nodes if n.meta.get(REALIZE)]
    assert len(marked) == 1 and marked[0].target is prims.convert_element_type.default
    product = marked[0].args[0]
    assert product.target is aten.mul.Tensor
    silu = product.args[0]  # silu decomposed: x / (1 + exp(-x)) in float32, cast back to bfloat16
    assert silu.target is prims.convert_element_type.default and silu.args[0].target is aten.div.Tensor

    graph = post_grad_graph(rows=2)
    assert aten.mm.default in [n.target for n in graph.nodes]
    StoreGemvInputs()(graph)
    assert not any(n.meta.get(REALIZE) for n in graph.nodes)


def test_store_option_hands_the_pass_to_inductor(monkeypatch):
    """As the decode step's post-grad pass; the prefill drops the option (tests/test_generation.py)."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(kwargs))
    module = fxtp.compile(tiny_model("llama"), 1).with_cache(1, 16).rank_graph(0)
    DecodeGraph(module, {"coordinate_descent_tuning": True, STORE: True})
    assert isinstance(compiled["options"].pop(POST_GRAD), StoreGemvInputs)
    assert compiled["options"] == {"coordinate_descent_tuning": True}
    DecodeGraph(module, {"coordinate_descent_tuning": True, STORE: False})
    assert compiled["options"] == {"coordinate_descent_tuning": True}
    assert STORE in DECODE_ONLY
    cuda = torch.device("cuda", 0)
    assert inductor_options({}, "", 1, cuda)[STORE] is False  # off by default
    with pytest.raises(ValueError, match="post_grad_custom_post_pass"):
        inductor_options({STORE: True, POST_GRAD: StoreGemvInputs()}, "", 1, cuda)
