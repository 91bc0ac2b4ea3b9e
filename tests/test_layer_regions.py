"""fxtp/decode/layer_regions.py: a rank's step cut into layer regions computes what the step computes,
writes its KV cache the same, and compiles each kind of layer once."""
from functools import lru_cache

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings, strategies as st

from fxtp.runtime.program import compile_on_first_use
from fxtp.decode.layer_regions import compile_by_layer, layer_runs, state_layer
from fxtp.capture.static_cache import is_cache_state, sized_dims
from fxtp.tiny_configs import CAUSAL_LMS, tiny_model

LAYERS = 7  # enough alike layers to share at 2 ranks, where layer 0 and the head are kinds of their own


@pytest.mark.parametrize("name, layer", [
    ("model.layers.3.mlp.up_proj.weight", 3), ("transformer.h.12.attn.c_attn.weight", 12),
    ("model.layers.3.mlp.experts.7.w1", 3), ("kv_cache.key_3", 3),
    ("merged_model_layers_3_self_attn_q_proj_weight", 3), ("model.embed_tokens.weight", -1),
    ("lm_head.weight", -1), ("model.rotary_emb.inv_freq", -1), ("model.layers3.weight", -1)])
def test_the_layer_of_a_state_name(name, layer):
    assert state_layer(name) == layer


@lru_cache(maxsize=None)
def cached_program(arch: str, world_size: int):
    """The program with a static cache (2 rows of 32 tokens) of a tiny `arch` of LAYERS layers."""
    return compile_on_first_use(tiny_model(arch, layers=LAYERS), world_size).with_cache(2, 32)


def cached_rank_graphs(arch: str, world_size: int = 1):
    """Two copies of rank 0's graph with a static cache: one to cut, one to compare with."""
    program = cached_program(arch, world_size)
    return program.rank_graph(0), program.rank_graph(0)


def steps(batch: int, prompt: int, length: int):
    """A prefill's inputs, then two decode steps' (input_ids, mask, positions, cache positions)."""
    gen = torch.Generator().manual_seed(prompt)
    mask = torch.ones(batch, length, dtype=torch.long)
    yield (torch.randint(3, 100, (batch, prompt), generator=gen), mask, torch.arange(prompt).expand(batch, prompt),
           torch.arange(prompt))
    for i in range(prompt, prompt + 2):
        yield torch.randint(3, 100, (batch, 1), generator=gen), mask, torch.full((batch, 1), i), torch.tensor([i])


def assert_same_runs(step, module, reference, exact: bool, batch: int = 2, length: int = 32):
    with torch.no_grad():
        for args in steps(batch, 7, length):
            got, want = step(*args), reference(*args)
            assert torch.equal(got, want) if exact else torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    caches = {name: t for name, t in reference.named_buffers() if is_cache_state(name)}
    assert caches
    for name, cache in module.named_buffers():
        if is_cache_state(name):
            assert torch.equal(cache, caches[name]) if exact else torch.allclose(cache, caches[name], atol=1e-5), name


@pytest.mark.slow  # by default the llama step below, compiled
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(CAUSAL_LMS))
def test_the_regions_compute_the_step_and_write_its_cache(arch):
    """Uncompiled regions run the step's own ops in its order: bit for bit the same logits and cache."""
    module, reference = cached_rank_graphs(arch)
    step = compile_by_layer(module, lambda region: region)
    assert step.regions in (1, len(layer_runs(module.graph)))  # 1: too few alike layers to share
    assert_same_runs(step, module, reference, exact=True)


def test_alike_layers_share_one_compiled_function_and_compile_once():
    """Llama's layers are one kind, the last included: the prologue, a layer and the head (the final
    norm and the LM head) compile, three graphs whatever the depth."""
    module, reference = cached_rank_graphs("llama")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = compile_by_layer(module, lambda region: torch.compile(region, backend="eager", dynamic=True,
                                                                 fullgraph=True))
    assert (step.regions, step.compiled_regions) == (LAYERS + 2, 3)
    assert_same_runs(step, module, reference, exact=False)
    # the prefill, then the decode length (1, specialized): one graph of each kind each, not one per layer
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2 * step.compiled_regions


def test_a_cache_of_another_size_reuses_the_compiled_regions():
    """The prefill's regions are kept by the generator (compile_by_layer's `compiled`) with the KV
    cache's sizes dynamic (`sized`): the program for 3 rows of 64 tokens runs on the regions compiled
    for 2 rows of 32, recompiling none, and computes what its own step does."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = {}

    def by_layer(module):
        return compile_by_layer(module, lambda region: torch.compile(region, backend="eager", dynamic=True,
                                                                     fullgraph=True), compiled, sized_dims)

    programs = compile_on_first_use(tiny_model("llama", layers=LAYERS), 1)
    programs.with_cache(1, 16)  # the first size is captured at its size (and never used here)
    module, reference = programs.with_cache(2, 32).rank_graph(0), programs.with_cache(2, 32).rank_graph(0)
    assert_same_runs(by_layer(module), module, reference, exact=False)
    kinds, graphs = len(compiled), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    module, reference = programs.with_cache(3, 64).rank_graph(0), programs.with_cache(3, 64).rank_graph(0)
    assert_same_runs(by_layer(module), module, reference, exact=False, batch=3, length=64)
    assert (len(compiled), torch._dynamo.utils.counters["stats"]["unique_graphs"]) == (kinds, graphs)


def reads_after_a_write() -> fx.GraphModule:
    """out = y + buffer * 2 after buffer += y, y = x * layers.0 * layers.1, in ATen ops: `buffer * 2`
    reads no layer's state, but moving it up to the first run would read the buffer unwritten."""
    root = torch.nn.Module()
    root.layers = torch.nn.ParameterList([torch.nn.Parameter(torch.full((3,), 2.0)) for _ in range(2)])
    root.register_buffer("buffer", torch.ones(3))
    graph, aten = fx.Graph(), torch.ops.aten
    x, first, second, buffer = graph.placeholder("x"), *map(graph.get_attr, ("layers.0", "layers.1", "buffer"))
    y = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.mul.Tensor, (x, first)), second))
    graph.call_function(aten.add_.Tensor, (buffer, y))
    graph.output(graph.call_function(aten.add.Tensor, (y, graph.call_function(aten.mul.Tensor, (buffer, 2)))))
    return fx.GraphModule(root, graph)


def test_nodes_of_no_layer_move_up_only_past_no_write_of_what_they_read():
    module, reference = reads_after_a_write(), reads_after_a_write()
    aten = torch.ops.aten
    assert [n.target for n in layer_runs(module.graph)[-1]][-3:] == [aten.add_.Tensor, aten.mul.Tensor, aten.add.Tensor]
    x = torch.arange(3.0)
    assert torch.equal(compile_by_layer(module, lambda region: region)(x), reference(x))
    assert torch.equal(module.buffer, reference.buffer)


def test_attributes_must_be_state():
    class HoldsAModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.inner(x)

    traced = fx.symbolic_trace(HoldsAModule())
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, graph.get_attr("inner"))))
    with pytest.raises(TypeError, match="not state"):
        compile_by_layer(fx.GraphModule(traced, graph), lambda region: region)


@pytest.mark.parametrize("world_size, kinds", [(1, 3), (2, 4)])
def test_the_decode_step_rewritten_for_the_gpu_still_cuts_into_alike_layers(world_size, kinds):
    """fxtp's decode rewrites (merged projections, fused rotary and gated GEMVs, decode attention; at
    2 ranks push all_reduce fused with the next layer's norm, which layer 0 has not) move nodes that
    read no layer's state across the cuts in some layers: they are put back, so the layers stay one
    kind. Built on the CPU; the regions compile when the step is first called, on the GPU."""
    from fxtp.decode.decode_graph import DecodeGraph
    from fxtp.decode.options import DecodeOptions, resolve
    options = resolve(DecodeOptions(), world_size=world_size, symmetric_memory=world_size > 1)
    step = DecodeGraph(cached_program("llama", world_size).rank_graph(0), options)
    assert step.compiled.regions == (LAYERS + 2, kinds)
