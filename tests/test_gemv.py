"""fxtp::gemv (fxtp/kernels/gemv.py): the kernel, counted as it launches (fxtp/kernels/launches.py),
against F.linear in Triton's interpreter (on the GPU where there is one; tests/test_cuda.py launches
it with and without PDL, eagerly and in CUDA-graph replays), its fallbacks, and the decode-step
rewrites that use it (DecodeOptions.gemv and gated_gemv)."""
import pytest
import torch
import torch.nn.functional as F

from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.kernels import gemv
from fxtp.kernels.dependent_launch import launching_with_pdl, preloads, uses_pdl
from fxtp.kernels.launches import counting_launches
from fxtp.passes.decode.fuse_gated_gemv import fuse_gated_gemv
from fxtp.passes.decode.merge_projections import merge_projections
from fxtp.passes.decode.retarget import with_gemv
from fxtp.passes.decode.shared_state_copy import twin
from fxtp.runtime.simulate import simulate
from fxtp.testing import traced_targets, tiny_program

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
aten = torch.ops.aten


def operands(rows: int, columns: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, columns, generator=generator).to(dtype)
    weight = (torch.randn(rows, columns, generator=generator) / columns ** 0.5).to(dtype)
    b = torch.randn(rows, generator=generator).to(dtype) if bias else None
    return [t if t is None else t.to(DEVICE) for t in (x, weight, b)]


def reference(x, weight, bias):
    return F.linear(x.double(), weight.double(), None if bias is None else bias.double())


def gated_reference(x, weight, bias, activation):
    """The unfused step's ops in x's dtype: the projection, its halves, the activation, the product."""
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](gate) * up


# rows not a multiple of BLOCK_N, columns not of BLOCK_K, and more than one block of each
@pytest.mark.parametrize("rows,columns,bias", [(20, 48, False), (37, 1030, True), (64, 2048, False), (3, 5, True)])
def test_gemv_float32_equals_linear_to_rounding(rows, columns, bias):
    x, weight, b = operands(rows, columns, torch.float32, bias)
    with counting_launches() as launches:
        out = torch.ops.fxtp.gemv(x, weight, b)
    assert launches == {"gemv": 1}  # the kernel computed it, not F.linear
    assert out.shape == (1, 1, rows) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_16_bit_is_the_float32_sum_rounded_once(dtype):
    x, weight, b = operands(40, 300, dtype, True)
    with counting_launches() as launches:
        out = torch.ops.fxtp.gemv(x, weight, b)
    assert launches == {"gemv": 1}
    exact = reference(x, weight, b)
    # one rounding of a float32 sum: within an ulp of the exact value (half a one on GPUs, which round
    # to nearest; Triton 3.9's interpreter truncates), plus float32's own error
    assert out.dtype == dtype
    assert ((out.double() - exact).abs() <= exact.abs() * torch.finfo(dtype).eps + 1e-4).all()


def test_gemv_falls_back_to_linear_where_the_kernel_does_not_apply():
    x, weight, b = operands(16, 32, torch.float32, True)
    rows = torch.cat([x, 2 * x], dim=1)  # two rows: a prefill or a batch
    transposed = weight.t().contiguous().t()  # not contiguous [out, in]
    with counting_launches() as launches:
        assert torch.equal(torch.ops.fxtp.gemv(rows, weight, b), F.linear(rows, weight, b))
        assert torch.equal(torch.ops.fxtp.gemv(x, transposed, b), F.linear(x, transposed, b))
        assert torch.equal(torch.ops.fxtp.gemv(x.double(), weight.double()), F.linear(x.double(), weight.double()))
    assert launches == {}


def test_gemv_fake_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.fxtp.gemv(torch.empty(2, 1, 32), torch.empty(24, 32))
    assert out.shape == (2, 1, 24)


def test_pdl_only_inside_the_context_and_only_on_gpus_that_have_it():
    assert not uses_pdl(DEVICE)
    with launching_with_pdl(True):
        assert uses_pdl(torch.device("cpu")) is False
        if DEVICE.type == "cuda":
            assert uses_pdl(DEVICE) is (torch.cuda.get_device_capability(DEVICE) >= (9, 0))
        with launching_with_pdl(False):
            assert not uses_pdl(DEVICE)
    assert not uses_pdl(DEVICE)



def test_the_decode_step_launches_gemvs_that_preload_their_weights_by_default(monkeypatch):
    """`DecodeOptions.gemv_preload` (on by default) reaches the kernel through DecodeGraph's launch
    context: under PDL the GEMV loads its first weights before its wait; without PDL there is no wait
    to load before."""
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    program = tiny_program("llama", 1)[1]
    for options, preload in ((DecodeOptions(), True), (DecodeOptions(gemv_preload=False), False)):
        with DecodeGraph(program.rank_graph(0), resolve(options, 1, False)).launching():
            assert preloads() is preload

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    monkeypatch.setattr(gemv, "triton_kernel", lambda: Kernel())
    x, weight, _ = operands(8, 16, torch.float32, False)
    for pdl in (False, True):
        monkeypatch.setattr(gemv, "uses_pdl", lambda device, pdl=pdl: pdl)
        for preload in (False, True):
            with launching_with_pdl(pdl, preload):
                assert preloads() is preload
                gemv.launch(x, weight)
                gemv.launch(x, weight, preload=not preload)
    assert [kwargs["PRELOAD"] for kwargs in launches] == [False] * 4 + [False, True, True, False]
    assert preloads() is True


def test_gemv_blocks_option_sets_the_block_sizes_the_step_launches(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    module = tiny_program("llama", 1)[1].rank_graph(0)
    assert DecodeGraph(module, resolve(DecodeOptions(), 1, False)).blocks == {}
    step = DecodeGraph(module, resolve(DecodeOptions(gemv_blocks={"8x16": [2, 16, 1]}), 1, False))
    assert step.blocks == {(8, 16): (2, 16, 1)}

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"],
                                                            kwargs["num_warps"]))

    monkeypatch.setattr(gemv, "triton_kernel", lambda: Kernel())
    x, weight, _ = operands(8, 16, torch.float32, False)
    with step.launching():
        gemv.launch(x, weight)
    gemv.launch(x, weight)
    assert launches == [((4,), 2, 16, 1), ((8,), 1, 16, 8)]


def test_block_sizes_by_row_length_and_form():
    """Llama-3-8B's weights at N=2, as timed in the step (benchmarks/results/decode_step_history.md): o at 8 warps, down two
    rows a program over 8 warps, gate|up two pairs over 8 warps, q|k|v (rotary) one pair over 8 warps
    with the whole row a step, lm_head one row over 4 warps; BLOCK_K at most a row."""
    assert gemv.block_sizes(4096, 2048) == (1, 2048, 8)
    assert gemv.block_sizes(4096, 7168) == (2, 2048, 8)
    assert gemv.block_sizes(14336, 4096, "gated") == (2, 2048, 8)
    assert gemv.block_sizes(3072, 4096, "rotary") == (1, 4096, 8)
    assert gemv.block_sizes(3072, 3000, "rotary") == (1, 4096, 8)
    for rows in (3072, 14336, 64128):
        assert gemv.block_sizes(rows, 4096) == (1, 2048, 4)
    for form in ("plain", "gated", "rotary"):
        assert gemv.block_sizes(40, 48, form) == (1, 64, 8)
        assert gemv.block_sizes(4096, 7168, form) == (2, 2048, 8)
    with gemv.launching_with_blocks({(4096, 7168): (4, 1024, 16)}):
        assert gemv.block_sizes(4096, 7168) == (4, 1024, 16)
        assert gemv.block_sizes(4096, 2048) == (1, 2048, 8)


# qwen2: projections with biases and without (o, the MLP, lm_head), so Llama's run with FXTP_SLOW=1
@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "qwen2"])
def test_with_gemv_rewrites_every_projection_and_keeps_the_logits(arch):
    _, tp = tiny_program(arch, 2)
    graphs = [tp.rank_graph(rank) for rank in range(2)]
    rewritten = [with_gemv(gm, prefetch_bytes=0) for gm in graphs]
    linears = [node.target for node in graphs[0].graph.nodes].count(aten.linear.default)
    targets = [node.target for node in rewritten[0].graph.nodes]
    assert linears > 0 and targets.count(gemv.projection) == linears
    assert aten.linear.default not in targets
    assert [node.target for node in graphs[0].graph.nodes].count(aten.linear.default) == linears  # left as it was
    prompts = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for ids, kernels in ((torch.tensor([[5]]), 2 * linears), (prompts, 0)):  # one token: the kernel; prompts: F.linear
        plain = simulate(graphs, (ids, None), {})
        with torch.no_grad(), counting_launches() as launches:
            rewritten_logits = simulate(rewritten, (ids, None), {})
        assert launches == ({"gemv": kernels} if kernels else {})
        for expected, logits in zip(plain, rewritten_logits):
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemv_on", [True, False])
@pytest.mark.parametrize("prefetch_bytes", [0, 8 << 20])
def test_the_decode_step_takes_fxtps_gemv_and_its_prefetch_from_the_options(gemv_on, prefetch_bytes, monkeypatch):
    """Every projection becomes fxtp's GEMV with `gemv` (the gated GEMV takes gate|up first), at the
    prefetch `gemv_prefetch_bytes` gives every form."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module))
    module = tiny_program("llama", 1)[1].rank_graph(0)
    DecodeGraph(module, resolve(DecodeOptions(gemv=gemv_on, gemv_prefetch_bytes=prefetch_bytes), 1, False))
    targets = [node.target for node in compiled[0].graph.nodes]
    calls = [node for node in compiled[0].graph.nodes if node.target in (gemv.projection, gemv.gated_projection)]
    assert (aten.linear.default in targets) is not gemv_on and (gemv.projection in targets) is gemv_on
    assert calls and all(node.kwargs["prefetch_bytes"] == prefetch_bytes for node in calls)


def test_projection_compiles_to_the_kernel_for_one_row_and_to_linear_for_more():
    """torch.compile (static shapes, as the decode step) sees `fxtp::gemv` at one row, and at several
    F.linear, which inductor compiles as it would without fxtp's GEMV."""
    _, weight, b = operands(16, 32, torch.float32, True)
    for rows, kernel in ((1, True), (3, False)):
        x = torch.randn(1, rows, 32, device=DEVICE)
        with counting_launches() as launches:
            out, targets = traced_targets(gemv.projection, x, weight, b, 0)
        assert launches == ({"gemv": 1} if kernel else {})
        torch.testing.assert_close(out, reference(x, weight, b).float(), rtol=1e-5, atol=1e-5)
        assert any(t in (torch.ops.fxtp.gemv, torch.ops.fxtp.gemv.default) for t in targets) is kernel
        assert (F.linear in targets) is not kernel


@pytest.mark.parametrize("activation", sorted(gemv.ACTIVATIONS))
# (74, 2100): two pairs a program (block_sizes' gated blocks), the last program holding one
@pytest.mark.parametrize("rows,columns,bias", [(40, 48, False), (74, 1030, True), (74, 2100, False)])
def test_gated_gemv_float32_equals_the_unfused_ops(activation, rows, columns, bias):
    x, weight, b = operands(rows, columns, torch.float32, bias)
    with counting_launches() as launches:
        out = torch.ops.fxtp.gemv(x, weight, b, activation=activation)
    assert launches == {"gated_gemv": 1}
    assert out.shape == (1, 1, rows // 2)
    torch.testing.assert_close(out, gated_reference(x, weight, b, activation), rtol=1e-5, atol=1e-5)


def test_gated_gemv_16_bit_rounds_as_the_unfused_ops():
    """The kernel rounds to bfloat16 where the unfused ops do (gate, up, the activation, the product):
    four roundings each, of at most half an ulp (relative 2^-8) on GPUs, which round to nearest, and a
    whole one where Triton's interpreter truncates. Another activation falls outside."""
    x, weight, b = operands(64, 300, torch.bfloat16, True)
    with counting_launches() as launches:
        out = torch.ops.fxtp.gemv(x, weight, b, activation="silu")
    assert launches == {"gated_gemv": 1}
    unfused = gated_reference(x, weight, b, "silu").float()
    rounding = 2 ** -8 if DEVICE.type == "cuda" else 2 ** -7
    assert ((out.float() - unfused).abs() <= unfused.abs() * (4 * rounding + 4 * 2 ** -8) + 1e-3).all()
    assert not torch.allclose(out.float(), gated_reference(x, weight, b, "gelu").float(), rtol=0.05, atol=1e-3)


def test_gated_gemv_falls_back_to_the_unfused_ops_and_checks_its_arguments():
    x, weight, b = operands(16, 32, torch.float32, True)
    rows = torch.cat([x, 2 * x], dim=1)
    with counting_launches() as launches:
        assert torch.equal(torch.ops.fxtp.gemv(rows, weight, b, activation="gelu_tanh"),
                           gated_reference(rows, weight, b, "gelu_tanh"))
    assert launches == {}
    with pytest.raises(ValueError, match="activation is one of silu, gelu, gelu_tanh"):
        torch.ops.fxtp.gemv(x, weight, b, activation="relu")
    with pytest.raises(ValueError, match="even number of rows"):
        torch.ops.fxtp.gemv(x, weight[:15], b[:15], activation="silu")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert torch.ops.fxtp.gemv(torch.empty(2, 1, 32), torch.empty(24, 32), activation="silu").shape == (2, 1, 12)


# llama: merged gate|up, silu; gemma: gelu (tanh); phi3: its own fused gate_up, chunked; qwen2: biases elsewhere
@pytest.mark.parametrize("arch, activation", [("llama", "silu"), ("gemma", "gelu_tanh"), ("phi3", "silu"),
                                              ("qwen2", "silu")])
def test_fuse_gated_gemv_fuses_every_mlp_and_keeps_the_logits(arch, activation):
    model, tp = tiny_program(arch, 2)
    graphs = [merge_projections(twin(tp.rank_graph(rank), "Merged")) for rank in range(2)]
    fused = [fuse_gated_gemv(twin(gm, "Gated"), prefetch_bytes=0) for gm in graphs]
    calls = [node for node in fused[0].graph.nodes if node.target is gemv.gated_projection]
    assert len(calls) == model.config.num_hidden_layers
    assert all(node.kwargs == {"prefetch_bytes": 0, "activation": activation} for node in calls)
    activations = (aten.silu.default, aten.gelu.default)
    assert not any(node.target in activations for node in fused[0].graph.nodes)
    assert any(node.target in activations for node in graphs[0].graph.nodes)  # the merged twin is left as it was
    prompts = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for ids, kernels in ((torch.tensor([[5]]), 2 * len(calls)), (prompts, 0)):  # one token: the kernel; prompts: its fallback
        with torch.no_grad():
            plain = simulate(graphs, (ids, None), {})
            with counting_launches() as launches:
                fused_logits = simulate(fused, (ids, None), {})
        assert launches == ({"gated_gemv": kernels} if kernels else {})
        for expected, logits in zip(plain, fused_logits):
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_fuse_gated_gemv_leaves_what_is_not_a_gated_projection():
    """Unmerged gate and up (two projections), an activation read twice, and unequal halves stay."""
    model, tp = tiny_program("llama", 1)
    layers = model.config.num_hidden_layers
    unmerged = fuse_gated_gemv(twin(tp.rank_graph(0), "Gated"), prefetch_bytes=0)
    assert gemv.gated_projection not in [node.target for node in unmerged.graph.nodes]
    merged = merge_projections(twin(tp.rank_graph(0), "Merged"))
    first, second = [node for node in merged.graph.nodes if node.target is aten.silu.default][:2]
    with merged.graph.inserting_after(first):
        merged.graph.call_function(aten.neg.default, (first,))  # a second reader of layer 0's activation
    split = first.args[0].args[0]
    halves = second.args[0].args[0]
    assert split.target is halves.target is aten.split_with_sizes.default
    rows = sum(halves.args[1])
    halves.args = (halves.args[0], [rows // 2 - 1, rows // 2 + 1], -1)  # layer 1's halves made unequal
    fused = fuse_gated_gemv(merged, prefetch_bytes=0)
    assert [node.target for node in fused.graph.nodes].count(gemv.gated_projection) == layers - 2
    assert [node.target for node in fused.graph.nodes].count(aten.silu.default) == 2


def test_the_decode_step_fuses_gated_mlps_by_default(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module))
    model, program = tiny_program("llama", 1)
    for options in (DecodeOptions(), DecodeOptions(gemv=True, gemv_prefetch_bytes=8 << 20),
                    DecodeOptions(gated_gemv=False)):
        DecodeGraph(program.rank_graph(0), resolve(options, 1, False))
        calls = [node.kwargs for node in compiled[-1].graph.nodes
                 if node.target in (gemv.projection, gemv.gated_projection)]
        gated = [kwargs for kwargs in calls if kwargs.get("activation") == "silu"]
        assert len(gated) == (model.config.num_hidden_layers if options.gated_gemv else 0)
        assert all(kwargs["prefetch_bytes"] == options.gemv_prefetch_bytes for kwargs in calls)
        assert len(calls) > len(gated) if options.gemv else len(calls) == len(gated)


def test_gated_projection_compiles_to_the_kernel_for_one_row_and_to_plain_ops_for_more():
    """torch.compile (static shapes, as the decode step) sees the gated op at one row and the unfused
    ops, which inductor fuses as it did before the pass, at several."""
    _, weight, b = operands(16, 32, torch.float32, True)
    for rows, kernel in ((1, True), (3, False)):
        x = torch.randn(1, rows, 32, device=DEVICE)
        with counting_launches() as launches:
            out, targets = traced_targets(gemv.gated_projection, x, weight, b, 0, "silu")
        assert launches == ({"gated_gemv": 1} if kernel else {})
        torch.testing.assert_close(out, gated_reference(x, weight, b, "silu"), rtol=1e-5, atol=1e-5)
        assert any(t in (torch.ops.fxtp.gemv, torch.ops.fxtp.gemv.default) for t in targets) is kernel
        assert (F.linear in targets) is not kernel
