"""fxtp::push_all_reduce_add_rms_norm (fxtp/kernels/push_all_reduce.py) and passes/decode/fuse_add_rms_norm.py.

The push kernel with its norm epilogue runs in Triton's interpreter on real processes over shared
CPU memory (tests/push_harness.py), interleaved with plain push rounds on the same buffers as in a
decode step, counted as it launches (fxtp/kernels/launches.py). The rewrite is checked on tiny rank graphs: what it fuses, what it leaves alone, and
that the fused graph computes the unfused graph's logits on gloo (the op's torch fallback). On
GPUs, tests/test_cuda.py runs the op with symmetric memory and generates with `fxtp.push_norm`.
"""
import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import fxtp
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.kernels import push_all_reduce as pushed
from fxtp.kernels.launches import counting_launches
from fxtp.passes.decode.fuse_add_rms_norm import FUSED, fuse_add_rms_norm
from fxtp.passes.decode.retarget import with_push_all_reduce
from fxtp.runtime.rank_processes import run_ranks
from fxtp.testing import tiny_program
from fxtp.tiny_configs import tiny_model
from push_harness import assert_rotated, interpreted_addresses, shared_workspaces

ROUNDS = 7  # the three buffers each serve two rounds or more
PLAIN_ROUNDS = (2, 5)  # plain push on the same buffers, as a decode step's embedding all_reduce
EPS = 1 / 16  # large enough against mean(h^2) ~ 4 that a wrong eps shows in float32
# (dtype, rows, hidden size) per world size: batch 1 and 3, sizes that are and are not powers of two
KERNEL_CASES = {2: [(torch.bfloat16, 1, 64), (torch.float32, 3, 96)],
                3: [(torch.float32, 1, 128), (torch.bfloat16, 3, 100)]}
# normed against torch's (add_rms_norm): the interpreter truncates the normalized row and the product
# to bfloat16 where torch rounds, and its hidden may sit one truncation below torch's, so within 3
# bfloat16 ulps (2^-7 relative each). Against the same rounded as the interpreter rounds
# (interpreted_norm) only the order of the mean's sum and rsqrt's last float32 bit differ: 1e-6.
NORMED_TOLERANCE = {torch.bfloat16: dict(rtol=3 * 2 ** -7, atol=1e-6), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def fused_rounds_on_rank(rank: int, cases: list) -> tuple:
    """Rank body: per case, the interpreted kernel over every round of this rank's part, with the
    epilogue but in PLAIN_ROUNDS; and its launches."""
    results = []
    with counting_launches() as launches:
        for buffers, states, parts, residuals, weight in cases:
            addresses, world = interpreted_addresses(buffers), len(buffers)
            results.append([
                pushed.launch(part[rank], addresses, states[rank], rank, world) if round in PLAIN_ROUNDS
                else pushed.launch_add_rms_norm(part[rank], residual, weight, EPS, addresses, states[rank], rank, world)
                for round, (part, residual) in enumerate(zip(parts, residuals))])
    return results, launches


def interpreter_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float32 `x` cast to `dtype` as Triton's interpreter casts: bfloat16 truncated (GPUs round)."""
    if dtype == torch.bfloat16:
        return (x.view(torch.int32) & -2 ** 16).view(torch.float32).to(dtype)
    return x.to(dtype)


def interpreted_norm(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The epilogue's normed from its hidden, rounded where it rounds as the interpreter rounds."""
    upcast = hidden.float()
    normalized = interpreter_cast(upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + EPS), hidden.dtype)
    return interpreter_cast(weight.float() * normalized.float(), hidden.dtype)


# 3 ranks cover both dtypes at one and several rows; at 2 ranks test_gemv_push runs the epilogue too,
# so its cases here run with FXTP_SLOW=1
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_kernel_adds_the_residual_and_normalizes_every_row_every_round(world):
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(world)
    cases = []
    for dtype, rows, size in KERNEL_CASES[world]:
        parts = [torch.randn(world, rows, size, generator=generator).to(dtype) for _ in range(ROUNDS)]
        parts[1][0, 0, :7] = -0.0  # one rank's -0.0 must not read as "not arrived yet"
        parts[3][:, -1, :7] = -0.0  # nor everyone's
        residuals = [torch.randn(rows, size, generator=generator).to(dtype) for _ in range(ROUNDS)]
        cases.append((*shared_workspaces(world, dtype, rows * size), parts, residuals,
                      torch.randn(size, generator=generator).to(dtype)))
    ranks = run_ranks(fused_rounds_on_rank, world, cases, timeout=300)
    normed_rounds = ROUNDS - len(PLAIN_ROUNDS)
    assert [launches for _, launches in ranks] == [{"push_all_reduce": len(cases) * len(PLAIN_ROUNDS),
                                                    "push_all_reduce_add_rms_norm": len(cases) * normed_rounds}] * world
    ranks = [results for results, _ in ranks]
    for index, (buffers, states, parts, residuals, weight) in enumerate(cases):
        dtype = parts[0].dtype
        for round, (part, residual) in enumerate(zip(parts, residuals)):
            total = interpreter_cast(sum(p.float() for p in part), dtype)  # in rank order, as the kernel sums
            results = [rank_results[index][round] for rank_results in ranks]
            if round in PLAIN_ROUNDS:
                assert all(torch.equal(result, total) for result in results), (dtype, round)
                continue
            hidden = interpreter_cast(total.float() + residual.float(), dtype)
            _, normed = pushed.add_rms_norm(total, residual, weight, EPS, dtype)
            for got_hidden, got_normed in results:
                assert torch.equal(got_hidden, hidden), (dtype, round)
                torch.testing.assert_close(got_normed, normed, **NORMED_TOLERANCE[dtype])
                torch.testing.assert_close(got_normed, interpreted_norm(hidden, weight), rtol=1e-6, atol=1e-6)
                assert torch.equal(got_normed, results[0][1])  # every rank gets the same bits
        assert_rotated(buffers, states, ROUNDS, dtype)


@pytest.mark.parametrize("normalized_dtype, x_dtype, size, rows, fits", [
    (torch.bfloat16, torch.bfloat16, 4096, 1, True),
    (None, torch.float32, pushed.MAX_ROW, 16, True),
    (None, torch.bfloat16, 4096, 1, False),  # the graph takes its statistics in bfloat16
    (torch.float16, torch.bfloat16, 4096, 1, False),  # it rounds the normalized row to another dtype
    (torch.bfloat16, torch.bfloat16, 2 * pushed.MAX_ROW, 1, False),  # a row longer than a program holds
    (torch.bfloat16, torch.bfloat16, 4096, 65, False),  # over MAX_BYTES
])
def test_the_epilogue_runs_only_where_it_computes_what_the_graph_does(normalized_dtype, x_dtype, size, rows, fits):
    x, weight = (torch.empty(shape, dtype=x_dtype, device="meta") for shape in ((rows, 1, size), (size,)))
    assert pushed.fits_norm_epilogue(x, x, weight, normalized_dtype) is fits
    assert not pushed.fits_norm_epilogue(x, x, weight[:-1], normalized_dtype)
    assert not pushed.fits_norm_epilogue(x, x[:, :, :-1], weight, normalized_dtype)


def test_fake_gives_the_graph_dtypes():
    with FakeTensorMode():
        x = torch.empty(3, 1, 64, dtype=torch.bfloat16)
        hidden, normed = torch.ops.fxtp.push_all_reduce_add_rms_norm(x, x, torch.empty(64), 1e-6, torch.bfloat16, "g")
    assert (hidden.shape, hidden.dtype, normed.shape, normed.dtype) == (x.shape, torch.bfloat16, x.shape, torch.float32)


@functools.lru_cache(maxsize=None)
def program_in(arch: str, dtype: torch.dtype):
    """The tiny model's program over 2 ranks in `dtype`, compiled once (each rank_graph call makes a new graph)."""
    return tiny_program(arch, 2)[1] if dtype == torch.float32 else fxtp.compile(tiny_model(arch).to(dtype), 2)


def pushed_rank_graph(arch: str, dtype: torch.dtype, cached: bool = False):
    tp = program_in(arch, dtype)
    return with_push_all_reduce((tp.with_cache(1, 64) if cached else tp).rank_graph(0))


@pytest.mark.parametrize("dtype, cached", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_rewrite_fuses_every_all_reduce_before_a_norm(dtype, cached):
    """Each layer's two all_reduces are followed by the residual add and the next norm: the second
    layer's by the model's final norm, whose hidden states nothing else reads. The embedding's
    all_reduce has no add before the first norm and stays."""
    twin = fuse_add_rms_norm(pushed_rank_graph("llama", dtype, cached))
    targets = [n.target for n in twin.graph.nodes]
    assert targets.count(FUSED) == 2 * tiny_model("llama").config.num_hidden_layers
    (embedding,) = [n for n in twin.graph.nodes if n.target is torch.ops.fxtp.push_all_reduce.default]
    assert embedding.args[0].target.__name__ == "vocab_parallel_embedding"
    assert targets.count(torch.ops.aten.rsqrt.default) == 1  # the first layer's norm
    fused = [n for n in twin.graph.nodes if n.target is FUSED]
    assert [n.args[2].target for n in fused] == ["model.layers.0.post_attention_layernorm.weight",
                                                 "model.layers.1.input_layernorm.weight",
                                                 "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"]
    assert all(n.args[3] == 1e-6 and n.args[4] == (None if dtype == torch.float32 else dtype) for n in fused)
    assert fused[1].args[1] is next(u for u in fused[0].users if u.args[1] == 0)  # the residual stream is hidden
    assert len(fused[-1].users) == 1  # the final norm's hidden is read by nothing


def add_and_norm(x, residual, weight, push_first=False, upcast=True, scale_upcast=True, cast_back=True, dim=-1,
                 one_plus=False, return_scale=False):
    """The residual add and an RMSNorm after a push all_reduce, HF Llama's by default; the flags
    make the variants the rewrite must tell apart."""
    total = torch.ops.fxtp.push_all_reduce(x, "group")
    hidden = total + residual if push_first else residual + total
    statistics = hidden.to(torch.float32) if upcast else hidden
    scale = torch.rsqrt(statistics.pow(2).mean(dim, keepdim=True) + 1e-6)
    normalized = (statistics if scale_upcast else hidden) * scale
    normalized = normalized.to(hidden.dtype) if cast_back else normalized
    normed = normalized * (1 + weight) if one_plus else weight * normalized
    return (hidden, normed, scale) if return_scale else (hidden, normed)


@pytest.mark.parametrize("variant, dtype, rounding", [  # rounding: the dtype argument of each fused op
    ({}, torch.bfloat16, [torch.bfloat16]),  # make_fx's casts are _to_copy, the weight a placeholder
    ({}, torch.float32, [None]),  # .to(float32) is no cast in float32
    ({"push_first": True}, torch.bfloat16, [torch.bfloat16]),
    ({"upcast": False}, torch.bfloat16, [None]),  # statistics in bfloat16: the op leaves them to torch
    ({"scale_upcast": False}, torch.bfloat16, []),  # T5: scales hidden itself
    ({"cast_back": False}, torch.bfloat16, []),  # a float32 normalized row
    ({"dim": 0}, torch.bfloat16, []),
    ({"one_plus": True}, torch.bfloat16, []),  # Gemma
    ({"return_scale": True}, torch.float32, []),  # the chain read elsewhere
])
def test_rewrite_matches_the_norm_node_by_node(variant, dtype, rounding):
    x, residual, weight = (torch.randn(shape, dtype=dtype) for shape in ((3, 1, 64), (3, 1, 64), (64,)))
    gm = make_fx(functools.partial(add_and_norm, **variant), tracing_mode="fake")(x, residual, weight)
    assert [n.args[4] for n in fuse_add_rms_norm(gm).graph.nodes if n.target is FUSED] == rounding


@pytest.mark.parametrize("arch", ["gemma", "cohere", "gpt2"])
def test_rewrite_leaves_other_norms_alone(arch):
    """Gemma's RMSNorm scales by (1 + weight), Cohere's and GPT-2's are LayerNorms."""
    unfused = [n.format_node() for n in pushed_rank_graph(arch, torch.float32).graph.nodes]
    assert [n.format_node() for n in fuse_add_rms_norm(pushed_rank_graph(arch, torch.float32)).graph.nodes] == unfused


def logits_with_and_without_fusion_on_rank(rank: int, ids: torch.Tensor) -> tuple:
    """Rank body: per model dtype, the rank module's logits and those of its fused pushed twin; and
    the kernels launched."""
    results = []
    with counting_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            module = fxtp.compile(tiny_model("llama").to(dtype), 2).module(rank)
            with torch.no_grad():
                results.append((module(ids), fuse_add_rms_norm(with_push_all_reduce(module))(ids)))
    return results, launches


def test_fused_graph_computes_the_same_logits_on_gloo():
    """On CPU tensors the op is gloo's all_reduce and torch's norm: no kernel runs, and the bits are the same."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for rank_results, launches in run_ranks(logits_with_and_without_fusion_on_rank, 2, ids, timeout=300):
        assert launches == {}
        for plain, fused in rank_results:
            assert torch.equal(plain, fused)


def test_push_norm_option_fuses_the_decode_step(monkeypatch):
    """On by default with push all_reduce (its default is tests/test_decode_options.py's)."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(module=module, **kwargs))
    module = tiny_program("llama", 2)[1].rank_graph(0)
    for options, fused in [(DecodeOptions(push_all_reduce=True), 4), (DecodeOptions(push_all_reduce=True, push_norm=False), 0),
                           (DecodeOptions(push_all_reduce=False), 0)]:
        DecodeGraph(module, resolve(options, 2, True))
        assert [n.target for n in compiled["module"].graph.nodes].count(FUSED) == fused
    assert FUSED not in [n.target for n in module.graph.nodes]  # the module itself is left as it was
