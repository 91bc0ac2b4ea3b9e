"""fxtp::rotary_gemv (fxtp/kernels/rotary_gemv.py), counted as it launches (fxtp/kernels/launches.py),
against the unfused ops in Triton's interpreter (on the GPU where there is one; tests/test_cuda.py
replays it in CUDA graphs), its fallbacks, and the decode-step rewrite that uses it
(passes/decode/fuse_rotary_gemv.py, DecodeOptions.rotary_gemv), down to greedy tokens equal to HF's."""
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.kernels import gemv
from fxtp.kernels.gemv import launch
from fxtp.kernels.launches import counting_launches
from fxtp.kernels.rotary_gemv import rotary_projection, unfused_rotary
from fxtp.kernels.triton_device import runs_triton_kernels
from fxtp.passes.decode.fuse_gated_gemv import fuse_gated_gemv
from fxtp.passes.decode.fuse_rotary_gemv import fuse_rotary_gemv
from fxtp.passes.decode.merge_projections import merge_projections
from fxtp.passes.decode.shared_state_copy import twin
from fxtp.testing import assert_generates_like_hf, traced_targets, tiny_program
from fxtp.tiny_configs import tiny_config, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
aten = torch.ops.aten


def operands(heads: int, kv_heads: int, head_dim: int, hidden: int, dtype: torch.dtype, bias: bool,
             rows: int = 1, length: int = 10, position: int = 3, seed: int = 0) -> list:
    """x [1, rows, hidden], W, b, cos, sin, positions, key and value caches [1, kv_heads, length, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    out = (heads + 2 * kv_heads) * head_dim
    angle = torch.randn(1, rows, head_dim // 2, generator=generator).repeat(1, 1, 2)
    tensors = [torch.randn(1, rows, hidden, generator=generator), torch.randn(out, hidden, generator=generator) / hidden ** 0.5,
               torch.randn(out, generator=generator) if bias else None, angle.cos(), angle.sin(),
               torch.arange(position, position + rows), torch.randn(1, kv_heads, length, head_dim, generator=generator),
               torch.randn(1, kv_heads, length, head_dim, generator=generator)]
    return [t if t is None else (t if t.dtype == torch.long else t.to(dtype)).to(DEVICE) for t in tensors]


def cloned(case: list) -> list:
    """A copy of the operands (caches included), so that one call's cache writes leave `case`'s alone."""
    return [t.clone() if t is not None else None for t in case]


def both(case: list, heads: int, kernel: bool = True) -> tuple:
    """(q, key cache, value cache) from the op and from the unfused ops, each on caches of its own;
    the op's computed by the kernel (`kernel`) or by its fallback."""
    fused, unfused = cloned(case), cloned(case)
    with counting_launches() as launches:
        q = torch.ops.fxtp.rotary_gemv(*fused, heads)
    assert launches == ({"rotary_gemv": 1} if kernel else {})
    expected = unfused_rotary(*unfused, heads)
    return (q, *fused[6:]), (expected, *unfused[6:])


# GQA, MHA, a bias, a position at the cache's end, K not a multiple of the GEMV's block (the last
# at block_sizes' whole-row step for rows of 2049-4096 columns)
@pytest.mark.parametrize("heads, kv_heads, head_dim, hidden, bias, position",
                         [(4, 2, 16, 48, False, 3), (2, 2, 8, 1030, True, 9), (6, 1, 32, 64, True, 0),
                          (2, 1, 16, 3000, False, 5)])
def test_rotary_gemv_float32_equals_the_unfused_ops(heads, kv_heads, head_dim, hidden, bias, position):
    case = operands(heads, kv_heads, head_dim, hidden, torch.float32, bias, position=position)
    (q, keys, values), (expected, expected_keys, expected_values) = both(case, heads)
    assert q.shape == (1, heads, 1, head_dim) and q.is_contiguous()
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    untouched = torch.arange(keys.shape[2]) != position  # the other positions keep their values exactly
    assert torch.equal(keys[:, :, untouched], case[6][:, :, untouched])
    assert torch.equal(values[:, :, untouched], case[7][:, :, untouched])


# several rows a program (rows not a multiple of it), one warp or eight, columns not a multiple of BLOCK_K
@pytest.mark.parametrize("blocks", [(4, 16, 1), (2, 64, 2), (16, 2048, 8)])
def test_every_form_of_the_gemv_computes_the_same_at_other_block_sizes(blocks):
    """The plain, gated and rotary GEMVs at `fxtp.gemv_blocks`' block sizes (fxtp/kernels/gemv.py's
    launching_with_blocks) give what they give at block_sizes' own, to float32 rounding."""
    case = operands(5, 1, 8, 100, torch.float32, True)  # W: [56, 100]
    x, weight, bias = case[:3]
    outputs = []
    for table in ({}, {tuple(weight.shape): blocks}):
        fused = cloned(case)
        with gemv.launching_with_blocks(table), counting_launches() as launches:
            assert gemv.block_sizes(*weight.shape) == (blocks if table else (1, 128, 8))
            outputs.append([launch(x, weight, bias), launch(x, weight, bias, activation="silu"),
                            torch.ops.fxtp.rotary_gemv(*fused, 5), *fused[6:]])
        assert launches == {"gemv": 1, "gated_gemv": 1, "rotary_gemv": 1}
    assert gemv.block_sizes(*weight.shape) == (1, 128, 8)
    for own, other in zip(*outputs):
        torch.testing.assert_close(other, own, rtol=1e-5, atol=1e-5)


def test_rotary_gemv_writes_nothing_past_the_caches_end():
    """index_copy_ would raise; in a CUDA graph the kernel cannot, so it leaves memory alone (the
    generator never asks for a position past max_length)."""
    case = operands(4, 2, 16, 48, torch.float32, False, length=10, position=10)
    keys, values = case[6].clone(), case[7].clone()
    with counting_launches() as launches:
        q = torch.ops.fxtp.rotary_gemv(*case, 4)
        assert torch.equal(case[6], keys) and torch.equal(case[7], values)
        case[5].fill_(9)
        torch.testing.assert_close(q, torch.ops.fxtp.rotary_gemv(*case, 4), rtol=0, atol=0)  # q does not depend on it
    assert launches == {"rotary_gemv": 2}


def test_rotary_gemv_16_bit_is_within_a_few_ulps_of_the_unfused_ops():
    """bfloat16: the kernel rounds the projection as the unfused ops do, then rotates in float32 and
    rounds once where they round after each product and the sum (and Triton's interpreter truncates)."""
    (q, keys, values), (expected, expected_keys, expected_values) = both(operands(4, 2, 16, 256, torch.bfloat16, True), 4)
    for got, want in ((q, expected), (keys[:, :, 3], expected_keys[:, :, 3]), (values, expected_values)):
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 4 * 2 ** -7 + 2e-2).all()


def test_rotary_gemv_falls_back_to_the_unfused_ops_and_gives_the_fake_shape():
    case = operands(4, 2, 16, 48, torch.float32, True, rows=3)  # a prefill: three rows
    (q, keys, values), (expected, expected_keys, expected_values) = both(case, 4, kernel=False)
    assert torch.equal(q, expected.contiguous()) and torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = [torch.empty(t.shape, dtype=t.dtype) if t is not None else None for t in case]
        assert torch.ops.fxtp.rotary_gemv(*fake, 4).shape == (1, 4, 3, 16)


def test_rotary_projection_compiles_to_the_kernel_for_one_row_and_to_plain_ops_for_more():
    for rows, kernel in ((1, True), (3, False)):
        case = operands(4, 2, 16, 48, torch.float32, False, rows=rows)
        expected = unfused_rotary(*cloned(case), 4)
        with counting_launches() as launches:
            q, targets = traced_targets(rotary_projection, *case, 4)
        assert launches == ({"rotary_gemv": 1} if kernel else {})
        torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
        assert any(t in (torch.ops.fxtp.rotary_gemv, torch.ops.fxtp.rotary_gemv.default) for t in targets) is kernel


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_inductor_writes_the_caches_in_place():
    """Compiled by inductor, the op mutates the step's caches where they are, with no copy of them."""
    from torch._inductor.utils import run_and_get_code

    def step(x, weight, cos, sin, position, key_cache, value_cache):
        return rotary_projection(x, weight, None, cos, sin, position, key_cache, value_cache, 4) * 2

    torch._dynamo.reset()
    case = operands(4, 2, 16, 48, torch.float32, False, length=64)
    args = [case[i] for i in (0, 1, 3, 4, 5, 6, 7)]
    expected = unfused_rotary(*cloned(case), 4) * 2
    expected_keys, expected_values = case[6].clone(), case[7].clone()
    unfused_rotary(*case[:6], expected_keys, expected_values, 4)
    with counting_launches() as launches:
        q, code = run_and_get_code(torch.compile(step, dynamic=False), *args)
    assert launches == {"rotary_gemv": 1}
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case[6], expected_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(case[7], expected_values, rtol=1e-5, atol=1e-5)
    assert "rotary_gemv.default(" in code[0] and "copy_" not in code[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside inductor
def test_inductor_computes_inputs_that_layers_share_once():
    """cos and sin read by two layers' ops are one buffer each, not a copy a layer (the op's layout is
    flexible: inductor's default for custom ops copies an input it has not stored yet at every op)."""
    from torch._inductor.utils import run_and_get_code

    def two_layers(x, weight, angle, position, keys, values, more_keys, more_values):
        cos, sin = angle.cos(), angle.sin()
        q = rotary_projection(x, weight, None, cos, sin, position, keys, values, 4)
        return q, rotary_projection(x, weight, None, cos, sin, position, more_keys, more_values, 4)

    torch._dynamo.reset()
    case = operands(4, 2, 16, 48, torch.float32, False, length=64)
    angle = torch.randn(1, 1, 16, device=DEVICE)
    with torch._inductor.config.patch(fx_graph_cache=False):  # the cache's key does not hold the op's tags
        _, code = run_and_get_code(torch.compile(two_layers, dynamic=False), case[0], case[1], angle, case[5],
                                   *case[6:], case[6].clone(), case[7].clone())
    calls = re.findall(r"rotary_gemv\.default\(([^)]*)\)", code[0])
    assert len(calls) == 2 and calls[0].split(", ")[3:5] == calls[1].split(", ")[3:5]


def fused_step(module):
    """What DecodeGraph builds before inductor with rotary_gemv and gated_gemv on (and fxtp's GEMV off)."""
    return fuse_gated_gemv(fuse_rotary_gemv(merge_projections(twin(module, "Merged")), 0), 0)


# qwen2: q|k|v biases; gemma: gelu, scaled embeddings; phi3: its own q|k|v, rotation joined with an empty pass;
# mixtral: experts in place of the gated MLP. The default suite runs mixtral (its attention is llama's);
# qwen2 (biases), phi3 (fused projections), llama and gemma (whose gelu gated GEMV is test_gemv's) run
# with FXTP_SLOW=1, each a minute in Triton's interpreter
@pytest.mark.parametrize("arch", [pytest.param(arch, marks=pytest.mark.slow) for arch in ("llama", "qwen2", "gemma", "phi3")]
                         + ["mixtral"])
def test_fused_steps_generate_hf_tokens(arch, monkeypatch):
    """Every rank's step with the rotary and gated GEMVs, run eagerly on 2 simulated ranks: the
    prefill (several rows: the unfused ops) and batch-1 decode steps (the kernels) give HF's tokens;
    at batch 2, the fallbacks do."""
    model = tiny_model(arch)
    tp = fxtp.compile(model, 2)
    generator = tp.generator()
    prepare = generator.prepare

    def prepare_fused(batch: int, length: int) -> None:
        new = generator._key != (batch, length)
        prepare(batch, length)
        if new:
            generator._modules = [fused_step(module) for module in generator._modules]
            counts = [[node.target for node in m.graph.nodes].count(rotary_projection) for m in generator._modules]
            assert counts == [model.config.num_hidden_layers] * 2

    monkeypatch.setattr(generator, "prepare", prepare_fused)
    monkeypatch.setattr(tp, "generator", lambda *args, **kwargs: generator)
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    # the kernels: 5 decode steps on 2 ranks, where they run on CPU tensors (Triton's interpreter, without a GPU)
    kernel_steps = 5 * 2 * model.config.num_hidden_layers if runs_triton_kernels(torch.device("cpu")) else 0
    gated = 0 if arch == "mixtral" else kernel_steps  # mixtral's experts are no gated MLP
    with counting_launches() as launches:
        assert_generates_like_hf(model, 2, ids[:1], mask[:1], max_new_tokens=6, program=tp)
    assert launches == {name: count for name, count in (("rotary_gemv", kernel_steps), ("gated_gemv", gated)) if count}
    with counting_launches() as launches:
        assert_generates_like_hf(model, 2, ids, mask, max_new_tokens=6, program=tp)
    assert launches == {}  # batch 2: the unfused ops


def test_fuse_rotary_gemv_leaves_what_it_does_not_know():
    """Unmerged q, k and v; a rotated k read by more than its cache write; q/k norms (qwen3) and a
    partial rotation (phi3 with partial_rotary_factor 0.5) stay."""
    model, program = tiny_program("llama", 1)
    cached = program.with_cache(batch_size=1, max_length=32)
    unmerged = fuse_rotary_gemv(twin(cached.rank_graph(0), "Rotary"), prefetch_bytes=0)
    assert rotary_projection not in [node.target for node in unmerged.graph.nodes]
    merged = merge_projections(twin(cached.rank_graph(0), "Merged"))
    write = next(node for node in merged.graph.nodes if node.target is aten.index_copy_.default)
    with merged.graph.inserting_after(write):
        merged.graph.call_function(aten.neg.default, (write.args[3],))  # a second reader of layer 0's rotated k
    fused = fuse_rotary_gemv(merged, prefetch_bytes=0)
    assert [node.target for node in fused.graph.nodes].count(rotary_projection) == model.config.num_hidden_layers - 1
    partial = tiny_config("phi3")
    partial.rope_parameters["partial_rotary_factor"] = 0.5
    # q/k norms; half of D rotated
    for other in (tiny_program("qwen3", 1)[1], fxtp.compile(AutoModelForCausalLM.from_config(partial), 1)):
        cached = other.with_cache(batch_size=1, max_length=32)
        kept = fuse_rotary_gemv(merge_projections(twin(cached.rank_graph(0), "Merged")), prefetch_bytes=0)
        assert rotary_projection not in [node.target for node in kept.graph.nodes], other.config.model_type


def test_layers_share_one_position_unless_it_is_written_before_it_is_read():
    """HF's static cache computes each layer's write position anew; the pass keeps the first, and the
    others go, but a position whose input is written in place before it is read stays its own."""
    model, program = tiny_program("llama", 1)
    cached = program.with_cache(batch_size=1, max_length=32)
    merged = merge_projections(twin(cached.rank_graph(0), "Merged"))
    positions = [node.args[2].name for node in merged.graph.nodes if node.target is aten.index_copy_.default][::2]
    assert len(set(positions)) == model.config.num_hidden_layers
    fused = fuse_rotary_gemv(twin(merged, "Rotary"), prefetch_bytes=0)
    assert {node.args[5].name for node in fused.graph.nodes if node.target is rotary_projection} == {positions[0]}
    assert not {node.name for node in fused.graph.nodes} & set(positions[1:])
    last = next(node for node in merged.graph.nodes if node.name == positions[-1])
    counter = next(arg for arg in last.args if arg.target is aten.clone.default)  # the layer's cache length
    with merged.graph.inserting_before(last):
        merged.graph.call_function(aten.add_.Tensor, (counter, 1))
    written = fuse_rotary_gemv(twin(merged, "Rotary"), prefetch_bytes=0)
    read = [node.args[5].name for node in written.graph.nodes if node.target is rotary_projection]
    assert read == [positions[0]] * (len(positions) - 1) + [positions[-1]]


def test_the_decode_step_fuses_rotary_by_default_and_not_when_turned_off(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module))
    model, program = tiny_program("llama", 1)
    cached = program.with_cache(batch_size=1, max_length=32)
    for options in (DecodeOptions(gemv_prefetch_bytes=8 << 20), DecodeOptions(rotary_gemv=False)):
        DecodeGraph(cached.rank_graph(0), resolve(options, 1, False))
        calls = [node for node in compiled[-1].graph.nodes if node.target is rotary_projection]
        assert len(calls) == (model.config.num_hidden_layers if options.rotary_gemv else 0)
        assert all(node.kwargs == {"prefetch_bytes": options.gemv_prefetch_bytes} for node in calls)
