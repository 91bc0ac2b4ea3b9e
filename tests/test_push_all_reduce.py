"""fxtp::push_all_reduce (fxtp/kernels/push_all_reduce.py).

Its Triton kernel runs in Triton's interpreter on real processes, with shared CPU memory standing in
for symmetric memory, counted as it launches (fxtp/kernels/launches.py): every part arrives, a part
holding -0.0 is not taken for an empty slot, the three buffers are emptied for their next use, and
rounds advance. On GPUs, tests/test_cuda.py runs it with symmetric memory and NCCL. The graph
rewrite is checked on a tiny Llama's rank graphs, where on the CPU the op is gloo's all_reduce.
"""
import pytest
import torch

import fxtp
from fxtp.kernels import push_all_reduce as pushed
from fxtp.kernels.launches import counting_launches
from fxtp.passes.decode.retarget import with_push_all_reduce
from fxtp.sharding.collectives import ALL_REDUCE, WAIT
from fxtp.testing import tiny_program
from fxtp.tiny_configs import tiny_model
from fxtp.runtime.rank_processes import run_ranks
from push_harness import assert_rotated, interpreted_addresses, shared_workspaces

ROUNDS = 7  # the three buffers each serve two rounds or more


def kernel_rounds_on_rank(rank: int, buffers: list, states: list, parts: list) -> tuple:
    """Rank body: the interpreted kernel over every round's part of this rank, and its launches."""
    addresses = interpreted_addresses(buffers)
    with counting_launches() as launches:
        sums = [pushed.launch(part[rank], addresses, states[rank], rank, len(buffers)) for part in parts]
    return sums, launches


@pytest.mark.parametrize("world, dtype, numel", [(2, torch.bfloat16, 2500),
                                                 pytest.param(3, torch.float32, 1000, marks=pytest.mark.slow)])
def test_kernel_sums_every_round_on_every_rank(world, dtype, numel):
    pytest.importorskip("triton")
    buffers, states = shared_workspaces(world, dtype, numel)
    generator = torch.Generator().manual_seed(world)
    # quarters in [-8, 8]: their sums are exact in bfloat16 too (the interpreter truncates, GPUs round)
    parts = [(torch.randint(-32, 33, (world, numel), generator=generator) / 4).to(dtype) for _ in range(ROUNDS)]
    parts[1][0, :7] = -0.0  # one rank's -0.0 must not read as "not arrived yet"
    parts[2][:, :7] = -0.0  # nor everyone's
    ranks = run_ranks(kernel_rounds_on_rank, world, buffers, states, parts, timeout=120)
    assert [launches for _, launches in ranks] == [{"push_all_reduce": ROUNDS}] * world
    for round, part in enumerate(parts):
        expected = part.float().sum(0).to(dtype)
        for rank, (sums, _) in enumerate(ranks):
            assert torch.equal(sums[round], expected), (round, rank)
    assert_rotated(buffers, states, ROUNDS, dtype)


def test_rewrite_replaces_every_all_reduce_and_shares_the_weights():
    _, tp = tiny_program("llama", 2)
    module = tp.rank_graph(0)
    twin = with_push_all_reduce(module)
    before = [n.target for n in module.graph.nodes]
    after = [n.target for n in twin.graph.nodes]
    layers = tp.model.config.num_hidden_layers
    assert before.count(ALL_REDUCE) == before.count(WAIT) == 2 * layers + 1  # and the module is left as it was
    assert ALL_REDUCE not in after and WAIT not in after
    assert after.count(torch.ops.fxtp.push_all_reduce.default) == 2 * layers + 1
    assert dict(twin.named_parameters()).keys() == dict(module.named_parameters()).keys()
    assert all(a is b for a, b in zip(twin.parameters(), module.parameters()))


def logits_with_and_without_push_on_rank(rank: int, ids: torch.Tensor) -> tuple:
    tp = fxtp.compile(tiny_model("llama"), 2)
    module = tp.module(rank)
    with torch.no_grad(), counting_launches() as launches:
        return module(ids), with_push_all_reduce(module)(ids), launches


# by default test_push_norm.py's and test_gemv_push.py's gloo tests run with_push_all_reduce's graph (the
# embedding's push_all_reduce on gloo, the layers' fused further) against the plain graph
@pytest.mark.slow
def test_rewritten_graph_computes_the_same_logits_on_gloo():
    """On CPU tensors the op is gloo's all_reduce: no kernel runs, and the bits are the same."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    for plain, pushed_logits, launches in run_ranks(logits_with_and_without_push_on_rank, 2, ids, timeout=300):
        assert torch.equal(plain, pushed_logits) and launches == {}
