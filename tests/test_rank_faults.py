"""Faults across real processes (2 gloo ranks): a rank that fails tells its peers, ranks given different
inputs or programs are caught, and nothing hangs. Each case is bounded: run_ranks ends it after 60 s."""
import random
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st

import fxtp
from fxtp.runtime.rank_guard import guard_rank_module
from fxtp.runtime.rank_agreement import describe
from fxtp.runtime.rank_processes import run_ranks
from fxtp.tiny_configs import tiny_model

LIMIT = 60.0  # seconds a case may take; a hang fails the test instead of the suite


def outcome(fn):
    """(error type or "ok", its message, seconds) of fn(), so that run_ranks reports every rank."""
    start = time.monotonic()
    try:
        fn()
        return "ok", "", time.monotonic() - start
    except Exception as error:
        return type(error).__name__, str(error), time.monotonic() - start


def program(layers: int = 1):
    torch.manual_seed(0)
    model = tiny_model("llama", layers=layers)
    return model, fxtp.compile(model, dist.get_world_size())


class InjectedFault(RuntimeError):
    pass


def raising(target):
    def fault(*args, **kwargs):
        raise InjectedFault(f"injected at {getattr(target, '__name__', target)}")
    return fault


def fault_at_a_node(rank: int, seed: int):
    """Rank 0's graph raises at a random node: the node's op is replaced by one that raises, so its graph
    keeps the nodes of the program (rank 1 runs on into its next collective). Rank 0's process stays
    alive until rank 1 is done (at most 45 s): only fail-fast can stop rank 1 sooner."""
    _, tp = program()
    group = dist.group.WORLD.group_name
    module = tp.rank_graph(rank, group)
    if rank == 0:
        node = random.Random(seed).choice([n for n in module.graph.nodes if n.op == "call_function"])
        node.target = raising(node.target)
        module.recompile()
    guard_rank_module(module, group, rank)
    store = dist.distributed_c10d._get_default_store()  # kept: the failing rank stays alive until rank 1 is done
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    result = outcome(lambda: module(ids, torch.ones_like(ids)))
    if rank == 0:
        store.wait(["test/rank 1 done"], timedelta(seconds=45))
    else:
        store.set("test/rank 1 done", "1")
    return result


def check_fault(seed):
    (kind0, _, _), (kind1, message1, seconds1) = run_ranks(fault_at_a_node, 2, seed, timeout=LIMIT)
    assert kind0 == "InjectedFault"
    assert kind1 == "PeerFailure" and message1.startswith("rank 0: InjectedFault: injected"), message1
    assert seconds1 < 30


@pytest.mark.parametrize("seed", [0, pytest.param(7, marks=pytest.mark.slow)])  # the hypothesis test draws more
def test_a_rank_failing_at_a_node_stops_its_peer_naming_it(seed):
    check_fault(seed)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_a_rank_failing_at_any_node_stops_its_peer_naming_it(seed):
    check_fault(seed)


def disagreements(rank: int):
    """Each way ranks can be given different work, one after another on one group (a disagreement
    leaves it usable), then agreeing ranks: same logits as the model, and the same tokens."""
    model, tp = program()
    module, generator = tp.module(rank), tp.generator(rank)
    found = {}
    for case in ("shapes", "values"):
        shape = (2, 8) if rank == 0 or case == "values" else (4, 4)
        ids = torch.full(shape, 5 + (rank if case == "values" else 0))
        found[case] = outcome(lambda: module(ids, torch.ones_like(ids)))
    other = program(layers=1 + rank)[1].module(rank)
    ids = torch.full((2, 8), 5)
    found["program"] = outcome(lambda: other(ids, torch.ones_like(ids)))
    found["generate"] = outcome(lambda: generator.generate(ids[:1, :4], max_new_tokens=3 + rank))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    found["agree"] = (module(ids, torch.ones_like(ids)) - expected).abs().max().item(), \
        generator.generate(ids[:1], max_new_tokens=3)
    return found


def test_ranks_given_different_work_all_raise_and_agreeing_ranks_run_as_before():
    ranks = run_ranks(disagreements, 2, timeout=LIMIT)
    for found in ranks:
        for case in ("shapes", "values"):
            kind, message, _ = found[case]
            assert kind == "RanksDisagree" and "input_ids: rank 0 has torch.int64 [2, 8]" in message, message
        kind, message, _ = found["program"]
        assert kind == "RanksDisagree" and "program (its nodes in order)" in message, message
        kind, message, _ = found["generate"]
        assert kind == "RanksDisagree" and "max_new_tokens: rank 0 has 3; rank 1 has 4" in message, message
        assert found["agree"][0] < 1e-5
    assert torch.equal(ranks[0]["agree"][1], ranks[1]["agree"][1])


def test_fingerprints_tell_apart_swapped_ids():
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[2, 1, 3]])
    assert describe(a) != describe(b)
    assert describe(a) == describe(a.clone())
    assert describe(1.5) == "1.5"
