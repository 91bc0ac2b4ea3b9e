"""fxtp/kernels/gemv_push.py's ops and passes/decode/fuse_gemv_push.py.

fxtp/kernels/gemv.py's GEMV with its push epilogue and fxtp/kernels/push_all_reduce.py's kernel with `pushed=True`
run in Triton's interpreter on real processes over shared CPU memory (tests/push_harness.py), with
rounds of plain push on the same buffers as in a decode step, counted as they launch
(fxtp/kernels/launches.py): they give the bits of the GEMV and then push all_reduce. The rewrite is checked on tiny rank graphs: what it fuses, and that the fused graph
computes the unfused graph's logits on gloo (the ops' fallback). On GPUs, tests/test_cuda.py runs
the ops with symmetric memory and generates with `DecodeOptions.gemv_push`.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fxtp
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.kernels import gemv
from fxtp.kernels import push_all_reduce as pushed
from fxtp.kernels.gemv_push import projection_all_reduce, projection_all_reduce_add_rms_norm
from fxtp.kernels.launches import counting_launches
from fxtp.passes.decode.fuse_add_rms_norm import fuse_add_rms_norm
from fxtp.passes.decode.fuse_gemv_push import fuse_gemv_push
from fxtp.passes.decode.retarget import with_push_all_reduce
from fxtp.runtime.rank_processes import run_ranks
from fxtp.testing import tiny_program
from fxtp.tiny_configs import tiny_model
from push_harness import assert_rotated, interpreted_addresses, shared_workspaces

ROUNDS = 7  # the three buffers each serve two rounds or more
PLAIN_ROUNDS = (2, 5)  # the GEMV, then plain push on the same buffers, as the embedding's all_reduce is
EPS = 1 / 16
COLUMNS = 48  # of a rank's weight: not a power of two, so the GEMV masks its last columns


def rounds_on_rank(rank: int, fused_buffers: tuple, unfused_buffers: tuple, xs: list, weights: torch.Tensor,
                   residuals: list, norm_weight, blocks) -> tuple:
    """Rank body: every round's sum (with the norm epilogue if `norm_weight` is not None), by the
    pushing GEMV and the summing kernel over `fused_buffers` (the GEMV then plain push in
    PLAIN_ROUNDS), and by the GEMV then push over `unfused_buffers`; the GEMVs at `blocks` (None:
    gemv.block_sizes'); and the kernels launched."""
    world = weights.size(0)
    fused_peers, unfused_peers = (pushed.Peers(interpreted_addresses(buffers), states[rank], rank, world)
                                  for buffers, states in (fused_buffers, unfused_buffers))

    def summed(part, peers, pushed_already, residual):
        if norm_weight is None:
            return pushed.launch(part, *peers, pushed=pushed_already)
        return pushed.launch_add_rms_norm(part, residual, norm_weight, EPS, *peers, pushed=pushed_already)

    fused, unfused = [], []
    with counting_launches() as launches:
        for round, (x, residual) in enumerate(zip(xs, residuals)):
            pushes = round not in PLAIN_ROUNDS
            part = gemv.launch(x[rank], weights[rank], blocks=blocks, push=fused_peers if pushes else None)
            fused.append(summed(part, fused_peers, pushes, residual))
            unfused.append(summed(gemv.launch(x[rank], weights[rank], blocks=blocks), unfused_peers, False, residual))
    return fused, unfused, launches


# the default suite runs 3 ranks without the norm (float16's -0.0) and 2 ranks with it at down's blocks;
# the other cases, minutes each in the interpreter, run with FXTP_SLOW=1
@pytest.mark.parametrize("world, dtype, rows, norm, blocks", [
    pytest.param(2, torch.bfloat16, 96, False, None, marks=pytest.mark.slow), (3, torch.float16, 40, False, None),
    pytest.param(2, torch.float32, 64, True, None, marks=pytest.mark.slow),
    pytest.param(2, torch.bfloat16, 80, True, None, marks=pytest.mark.slow),
    (2, torch.bfloat16, 75, True, (2, 32, 8))])  # two rows a program (down's blocks), the last one alone
def test_pushing_gemv_gives_the_bits_of_the_gemv_then_push(world, dtype, rows, norm, blocks):
    pytest.importorskip("triton")
    generator = torch.Generator().manual_seed(rows)
    weights = (torch.randn(world, rows, COLUMNS, generator=generator) / COLUMNS ** 0.5).to(dtype)
    xs = [torch.randn(world, 1, COLUMNS, generator=generator).to(dtype) for _ in range(ROUNDS)]
    if dtype == torch.float16:  # a row that sums to a negative number too small for float16: -0.0, not empty
        weights[:, 5] = 0
        weights[0, 5, 3] = -2 ** -24  # float16's smallest; its product with x below is half of it
        xs[1][0, 0, 3] = 0.5
    residuals = [torch.randn(1, rows, generator=generator).to(dtype) for _ in range(ROUNDS)]
    norm_weight = torch.randn(rows, generator=generator).to(dtype) if norm else None
    fused_buffers, unfused_buffers = (shared_workspaces(world, dtype, rows) for _ in range(2))
    ranks = run_ranks(rounds_on_rank, world, fused_buffers, unfused_buffers, xs, weights, residuals, norm_weight,
                      blocks, timeout=300)
    push = "push_all_reduce_add_rms_norm" if norm else "push_all_reduce"
    assert [launches for *_, launches in ranks] == [{"pushing_gemv": ROUNDS - len(PLAIN_ROUNDS),
                                                     "gemv": ROUNDS + len(PLAIN_ROUNDS), push: 2 * ROUNDS}] * world
    ranks = [(fused, unfused) for fused, unfused, _ in ranks]
    for round, x in enumerate(xs):
        reference = sum(x[rank].float() @ weights[rank].float().T for rank in range(world))
        results = []
        for fused, unfused in ranks:
            got, expected = fused[round], unfused[round]
            results.append(got[0] if norm else got)
            if norm:
                assert all(torch.equal(a, b) for a, b in zip(got, expected)), round
            else:
                assert torch.equal(got, expected), round
        assert all(torch.equal(result, results[0]) for result in results)  # every rank gets the same bits
        total = results[0] - residuals[round] if norm else results[0]
        torch.testing.assert_close(total.float(), reference, rtol=0.05, atol=0.05)  # the sum of the ranks' GEMVs
    if dtype == torch.float16:
        assert ranks[0][0][1][0, 5].item() == 0  # rank 0's -0.0 plus the others' zero row
    for buffers, states in (fused_buffers, unfused_buffers):
        assert_rotated(buffers, states, ROUNDS, dtype)


def test_only_the_plain_gemv_pushes():
    x, weight = torch.ones(1, 8), torch.ones(4, 8)
    peers = pushed.Peers(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), 0, 2)
    with pytest.raises(ValueError, match="only the plain GEMV pushes its outputs"):
        gemv.launch(x, weight, activation="silu", push=peers)


def test_fakes_give_the_graph_shapes_and_dtypes():
    with FakeTensorMode():
        x, weight = torch.empty(1, 1, 32, dtype=torch.bfloat16), torch.empty(64, 32, dtype=torch.bfloat16)
        residual, norm_weight = torch.empty(1, 1, 64, dtype=torch.bfloat16), torch.empty(64)
        total = torch.ops.fxtp.gemv_push_all_reduce(x, weight, None, 0, "g")
        hidden, normed = torch.ops.fxtp.gemv_push_all_reduce_add_rms_norm(x, weight, None, 0, residual, norm_weight,
                                                                          1e-6, torch.bfloat16, "g")
    assert (total.shape, total.dtype) == ((1, 1, 64), torch.bfloat16)
    assert (hidden.shape, hidden.dtype, normed.shape, normed.dtype) == ((1, 1, 64), torch.bfloat16, (1, 1, 64),
                                                                        torch.float32)


def fused(module, norm: bool):
    twin = with_push_all_reduce(module)
    return fuse_gemv_push(fuse_add_rms_norm(twin) if norm else twin, prefetch_bytes=0)


@pytest.mark.parametrize("norm", [True, False])
def test_rewrite_fuses_each_layers_two_projections_into_their_all_reduces(norm):
    """o and down end in an all_reduce in each layer; the embedding's all_reduce reads no projection."""
    module = tiny_program("llama", 2)[1].rank_graph(0)
    twin = fused(module, norm)
    layers = tiny_model("llama").config.num_hidden_layers
    targets = [n.target for n in twin.graph.nodes]
    projection = projection_all_reduce_add_rms_norm if norm else projection_all_reduce
    assert targets.count(projection) == 2 * layers
    assert targets.count(torch.ops.fxtp.push_all_reduce.default) == 1  # the embedding's
    assert torch.ops.fxtp.push_all_reduce_add_rms_norm.default not in targets
    linears = [n.target for n in module.graph.nodes].count(torch.ops.aten.linear.default)
    assert targets.count(torch.ops.aten.linear.default) == linears - 2 * layers
    for node in twin.graph.nodes:
        if node.target is projection:
            assert node.args[1].op == "get_attr" and node.args[2:4] == (None, 0)
            assert node.args[1].target.endswith(("o_proj.weight", "down_proj.weight"))


def logits_with_and_without_fusion_on_rank(rank: int, inputs: list) -> tuple:
    results = []
    module = fxtp.compile(tiny_model("llama"), 2).module(rank)
    with counting_launches() as launches:
        for norm in (True, False):
            twin = fused(module, norm)
            with torch.no_grad():
                results += [(module(ids), twin(ids)) for ids in inputs]
    return results, launches


def test_fused_graph_computes_the_same_logits_on_gloo():
    """Several rows: F.linear and gloo, the same bits. One row: fxtp's GEMV in the interpreter, which
    sums in its own order, then gloo (the fused op's fallback on CPU tensors): o and down of every
    layer, with the norm and without."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 100, shape, generator=generator) for shape in ((2, 7), (1, 1))]
    layers = tiny_model("llama").config.num_hidden_layers
    for rank_results, launches in run_ranks(logits_with_and_without_fusion_on_rank, 2, inputs, timeout=300):
        assert launches == {"gemv": 2 * 2 * layers}
        for index, (plain, fused) in enumerate(rank_results):
            if index % 2 == 0:
                assert torch.equal(plain, fused)
            else:
                torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_gemv_push_option_fuses_the_decode_step(monkeypatch):
    """Opt-in (its default and checks are tests/test_decode_options.py's); it takes o and down before
    fxtp's GEMV takes the other projections."""
    compiled = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.update(module=module, **kwargs))
    module = tiny_program("llama", 2)[1].rank_graph(0)
    for options, norm_fused, plain_fused in [(DecodeOptions(gemv_push=True), 4, 0),
                                             (DecodeOptions(push_norm=False, gemv_push=True), 0, 4),
                                             (DecodeOptions(), 0, 0)]:
        DecodeGraph(module, resolve(options, 2, symmetric_memory=True))
        targets = [n.target for n in compiled["module"].graph.nodes]
        assert targets.count(projection_all_reduce_add_rms_norm) == norm_fused
        assert targets.count(projection_all_reduce) == plain_fused
        assert targets.count(gemv.projection) > 0 and torch.ops.aten.linear.default not in targets
