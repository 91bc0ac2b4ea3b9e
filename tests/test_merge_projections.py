"""passes/decode/merge_projections.py on rank graphs: what it merges, that the merged graphs compute the
same logits (all ranks, in lockstep), that no weight is held twice, and what it leaves alone."""
import pytest
import torch
import torch.fx as fx

import fxtp
from fxtp.testing import tiny_program
from fxtp.tiny_configs import CAUSAL_LMS, LLAMA_FAMILY, tiny_model
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.passes.decode.fuse_add_rms_norm import FUSED
from fxtp.passes.decode.merge_projections import merge_projections
from fxtp.runtime.simulate import simulate
from fxtp.passes.decode.shared_state_copy import twin

LINEAR = torch.ops.aten.linear.default


def linears(gm: fx.GraphModule) -> int:
    return [n.target for n in gm.graph.nodes].count(LINEAR)


# per decoder layer, projections before and after: q|k|v and gate|up merge; Qwen2 with q, k, v biases;
# Phi-3's fused qkv_proj is unfused by the planner (GQA pieces), then merged again per rank; Mixtral's
# router reads the norm's output as q, k, v do, but after attention; Qwen2-MoE's shared expert's gate|up
# merge with its router and shared-expert gate, which read the same hidden states
# at 1 rank (the unsharded graph, whose projections merge as at 2) Llama's case runs by default, the others
# with FXTP_SLOW=1
@pytest.mark.parametrize("world_size, arch, before, after", [
    pytest.param(world_size, arch, before, after, marks=pytest.mark.slow if world_size == 1 and arch != "llama" else ())
    for world_size in (1, 2)
    for arch, before, after in [("llama", 7, 4), ("qwen2", 7, 4), ("phi3", 6, 4), ("mixtral", 5, 3), ("qwen2_moe", 9, 5)]])
def test_merged_rank_graphs_compute_the_same_logits(arch, before, after, world_size):
    model, tp = tiny_program(arch, world_size)  # shared; the rank graphs below own the weights the merge re-points
    graphs = [tp.rank_graph(rank) for rank in range(world_size)]
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = simulate(graphs, (ids, None), {})
        merged_graphs = [merge_projections(twin(gm, "Merged")) for gm in graphs]
        merged = simulate(merged_graphs, (ids, None), {})
        again = simulate(graphs, (ids, None), {})  # the original graphs now read views of the merged weights
    layers = model.config.num_hidden_layers
    assert (linears(graphs[0]), linears(merged_graphs[0])) == (before * layers + 1, after * layers + 1)
    for plain_logits, merged_logits, again_logits in zip(plain, merged, again):
        torch.testing.assert_close(merged_logits, plain_logits, rtol=0, atol=1e-5)
        assert torch.equal(again_logits, plain_logits)


# merged as test_merged_rank_graphs_compute_the_same_logits's architectures are (q|k|v and gate|up of a
# Llama-style layer, Phi-3's, the MoE layers), which it checks at 2 ranks as this test does: here with FXTP_SLOW=1
MERGED_LIKE_ABOVE = set(LLAMA_FAMILY) | {"phi3", "mixtral", "qwen2_moe"}


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=pytest.mark.slow) if arch in MERGED_LIKE_ABOVE else arch
                                  for arch in sorted(CAUSAL_LMS)])
def test_every_causal_lm_computes_the_same_logits_merged(arch):
    """Merged projections are on by default in every compiled decode step, so every architecture's
    rank graphs at 2 ranks: the same logits, merged or not, whatever the pass finds to merge (from
    nothing for GPT-2, Falcon, Bloom or GPT-NeoX, to q|k|v|gate|up in one for the
    parallel blocks of Cohere and Phi)."""
    _, tp = tiny_program(arch, 2)
    graphs = [tp.rank_graph(rank) for rank in range(2)]
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = simulate(graphs, (ids, None), {})
        merged = simulate([merge_projections(twin(gm, "Merged")) for gm in graphs], (ids, None), {})
    for plain_logits, merged_logits in zip(plain, merged):
        torch.testing.assert_close(merged_logits, plain_logits, rtol=0, atol=1e-5)


def test_weights_become_views_of_the_merged_tensor_and_a_second_merge_copies_nothing():
    """The rank's programs share one Parameter object per weight (program.rank_graph's `shared`), so the
    prefill and the model's other steps read the merged memory; another batch size merges in place."""
    tp = fxtp.compile(tiny_model("qwen2"), 2)
    shared = {}
    first = tp.with_cache(1, 16).rank_graph(1, shared=shared)
    merged = merge_projections(twin(first, "Merged"))
    qkv = merged.get_buffer("merged_model_layers_0_self_attn_q_proj_weight")
    bias = merged.get_buffer("merged_model_layers_0_self_attn_q_proj_bias")
    pieces = [first.get_parameter(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    assert qkv.shape == (sum(p.shape[0] for p in pieces), pieces[0].shape[1])
    start = 0
    for piece in pieces:
        assert piece.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert torch.equal(piece, qkv[start:start + piece.shape[0]])
        start += piece.shape[0]
    assert first.get_parameter("model.layers.0.self_attn.q_proj.bias").data_ptr() == bias.data_ptr()
    assert not any(name.startswith("model.layers.0.self_attn.q_proj") for name, _ in merged.named_parameters())

    second = merge_projections(twin(tp.with_cache(3, 32).rank_graph(1, shared=shared), "Merged"))
    assert second.get_buffer("merged_model_layers_0_self_attn_q_proj_weight").data_ptr() == qkv.data_ptr()


class Projections(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(8, 4, bias=bias) for bias in (False, False, True))


def graph_of(reads: list[tuple]) -> fx.GraphModule:
    """x, y inputs; one linear per (input name, layer names), returning them all."""
    graph = fx.Graph()
    inputs = {name: graph.placeholder(name) for name in ("x", "y")}
    outputs = []
    for source, *attrs in reads:
        outputs.append(graph.call_function(LINEAR, (inputs[source], *map(graph.get_attr, attrs))))
    graph.output(tuple(outputs))
    return fx.GraphModule(Projections(), graph)


@pytest.mark.parametrize("reads, merged", [
    ([("x", "a.weight"), ("x", "b.weight")], 1),
    ([("x", "a.weight"), ("y", "b.weight")], 0),  # other inputs
    ([("x", "a.weight"), ("x", "c.weight", "c.bias")], 0),  # one with a bias, one without
    ([("x", "a.weight"), ("x", "b.weight"), ("y", "b.weight")], 0),  # b read twice
    ([("x", "a.weight"), ("x", "a.weight")], 0),  # one weight twice
])
def test_what_is_merged_and_what_is_left_alone(reads, merged):
    args = [torch.randn(3, 8), torch.randn(3, 8)]
    gm = graph_of(reads)
    with torch.no_grad():
        expected = gm(*args)
        gm = merge_projections(gm)
        actual = gm(*args)
    assert linears(gm) == len(reads) - merged
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# fxtp's GEMV, rotary and gated GEMVs off: they take the projections that are counted
ONLY_MERGED = dict(gemv=False, rotary_gemv=False, gated_gemv=False)


@pytest.mark.parametrize("others", [dict(push_all_reduce=False, decode_attention=False),
                                    dict(push_all_reduce=True, push_norm=True, decode_attention=True)])
def test_merge_option_rewrites_the_decode_step(monkeypatch, others):
    """With fxtp's other rewrites of the step or without them, which start from the merged twin."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(module=module, **kwargs))
    module = tiny_program("llama", 2)[1].with_cache(1, 16).rank_graph(0)
    for merge, projections in [(True, 4 * 2 + 1), (False, 7 * 2 + 1)]:
        DecodeGraph(module, resolve(DecodeOptions(merge_projections=merge, **ONLY_MERGED, **others), 2, True))
        assert linears(compiled["module"]) == projections
        targets = [n.target for n in compiled["module"].graph.nodes]
        assert (FUSED in targets, torch.ops.fxtp.decode_attention.default in targets) == (others["push_all_reduce"],) * 2
    assert linears(module) == 7 * 2 + 1  # the module itself is left as it was
