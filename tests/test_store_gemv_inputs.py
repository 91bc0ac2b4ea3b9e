"""passes/decode/store_gemv_inputs.py on the aten graph inductor's own decompositions make (on the meta
device, which they treat as a GPU): which node it marks, and how the decode step hands it to inductor."""
import torch
import torch.nn.functional as F
from torch._inductor import config
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from fxtp.testing import tiny_program
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.node_meta import REALIZE
from fxtp.passes.decode.store_gemv_inputs import StoreGemvInputs, gemv_input

aten, prims = torch.ops.aten, torch.ops.prims


def down_projection(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight)


def post_grad_graph(function, *tensors: torch.Tensor) -> torch.fx.Graph:
    """`function`'s aten graph as inductor's decompositions make it for the decode step."""
    with config.patch(coordinate_descent_tuning=True):
        return make_fx(function, decomposition_table=select_decomp_table())(*tensors).graph


def down_projection_graph(rows: int) -> torch.fx.Graph:
    return post_grad_graph(down_projection, torch.randn(rows, 16, device="meta", dtype=torch.bfloat16),
                           torch.randn(4, 8, device="meta", dtype=torch.bfloat16))


def test_a_one_row_matmuls_input_is_marked_and_nothing_else():
    """At one row inductor's decomposition makes the matmul a reduction whose input is silu(g) * u,
    cast to float32; that cast of the product is what gets stored. At two rows the matmul stays
    `mm`, a GEMM, and nothing is marked."""
    graph = down_projection_graph(rows=1)
    StoreGemvInputs()(graph)
    marked = [n for n in graph.nodes if n.meta.get(REALIZE)]
    assert len(marked) == 1 and marked[0].target is prims.convert_element_type.default
    product = marked[0].args[0]
    assert product.target is aten.mul.Tensor
    silu = product.args[0]  # silu decomposed: x / (1 + exp(-x)) in float32, cast back to bfloat16
    assert silu.target is prims.convert_element_type.default and silu.args[0].target is aten.div.Tensor

    graph = down_projection_graph(rows=2)
    assert aten.mm.default in [n.target for n in graph.nodes]
    StoreGemvInputs()(graph)
    assert not any(n.meta.get(REALIZE) for n in graph.nodes)


def norm_and_attention_projections(hidden, norm_weight, q, k, v, weight):
    """A projection of an RMSNorm's output and one of attention's output, at one row."""
    x = hidden.float()
    normed = norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)).to(hidden.dtype)
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 1, -1)
    return F.linear(normed, weight), F.linear(attended, weight)


def test_an_input_computed_before_the_gemv_is_marked_and_a_cast_of_attentions_output_is_not():
    """The norm is arithmetic inductor would inline into the GEMV; attention's output is a buffer
    already, which the GEMV reads in place (storing its float32 cast would only add a copy)."""
    bf16 = dict(device="meta", dtype=torch.bfloat16)
    heads = [torch.randn(1, 2, keys, 8, **bf16) for keys in (1, 20, 20)]
    tensors = (torch.randn(1, 1, 16, **bf16), torch.randn(16, **bf16), *heads, torch.randn(16, 16, **bf16))
    graph = post_grad_graph(norm_and_attention_projections, *tensors)
    StoreGemvInputs()(graph)
    inputs = [x for x in map(gemv_input, graph.nodes) if x is not None]
    assert len(inputs) == 2
    normed, attended = inputs
    assert normed.meta.get(REALIZE) and not attended.meta.get(REALIZE)
    assert [n for n in graph.nodes if n.meta.get(REALIZE)] == [normed]


def test_store_option_hands_the_pass_to_inductor(monkeypatch):
    """As the decode step's post-grad pass, or the user's own in its place; the prefill drops it
    (tests/test_generation.py), and its default is tests/test_decode_options.py's."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(kwargs))
    module = tiny_program("llama", 1)[1].with_cache(1, 16).rank_graph(0)
    DecodeGraph(module, resolve(DecodeOptions(store_gemv_inputs=True), 1, False))
    assert isinstance(compiled["options"].pop("post_grad_custom_post_pass"), StoreGemvInputs)
    assert compiled["options"] == {"coordinate_descent_tuning": False, "triton.enable_pdl": True,
                                   "_collective.auto_select": False}
    DecodeGraph(module, resolve(DecodeOptions(store_gemv_inputs=False), 1, False))
    assert "post_grad_custom_post_pass" not in compiled["options"]
    users_pass = StoreGemvInputs()
    DecodeGraph(module, resolve(DecodeOptions(inductor={"post_grad_custom_post_pass": users_pass}), 1, False))
    assert compiled["options"]["post_grad_custom_post_pass"] is users_pass
