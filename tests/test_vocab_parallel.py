"""Vocab-parallel embedding and column-parallel (gathered) lm_head: tiny models simulated,
Llama-3-8B's shape planned on meta, and a tied model on real gloo processes.

The rank function at the bottom runs in spawned processes, which import this file by module
name, so it must stay at module level.
"""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.sharding import collectives
from fxtp.node_meta import COLLECTIVE, STATE
from fxtp.tiny_configs import real_config, tiny_model
from fxtp.runtime.rank_processes import run_ranks
from fxtp.sharding.layouts import balanced_counts
from fxtp.sharding.roles import Role
from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer, layer_of, planned_state_bytes, state_bytes
from fxtp.testing import assert_equivalent, max_abs_diff, tiny_program
from fxtp.rank_ops.vocab_parallel import local_padding_idx, vocab_parallel_embedding

ARCHS = ["llama", "gemma", "gpt2", "opt", "qwen2"]
TIED = {"gemma", "gpt2", "opt"}  # one state placeholder serves the embedding and the lm_head
VOCAB, HIDDEN = 256, 64

program = tiny_program


def role_weights(tp, role: Role) -> list[str]:
    return [w for g in tp.plan.groups if g.role == role for w in g.weights]


def left_padded_batch(vocab: int = VOCAB):
    ids = torch.randint(1, vocab, (3, 11), generator=torch.Generator().manual_seed(3))
    ids[1, 4], ids[2, 7] = 0, vocab - 1  # the first and the last vocab row, on the first and last rank
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def test_masked_lookups_sum_to_the_embedding():
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 3, 4, 9], [5, 6, 2, 1]])
    counts = balanced_counts(10, 3)  # 4, 3, 3
    parts = [vocab_parallel_embedding(weight[sum(counts[:r]):sum(counts[:r + 1])], ids, sum(counts[:r]), sum(counts))
             for r in range(3)]
    assert torch.equal(parts[0] + parts[1] + parts[2], F.embedding(ids, weight))
    assert [(p != 0).any(-1).sum().item() for p in parts] == [4, 3, 1]  # each id on one rank only
    assert [local_padding_idx(5, sum(counts[:r]), counts[r]) for r in range(3)] == [-1, 1, -1]
    assert local_padding_idx(-1, 0, 4) == -1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_equivalent_to_the_model(arch, world_size):
    model, tp = program(arch, world_size)
    ids, mask = left_padded_batch()
    assert_equivalent(model, world_size, ids, mask, program=tp, atol=1e-4)
    assert_equivalent(model, world_size, ids, None, program=tp, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_tables_are_sliced_by_vocab_rows(arch, world_size):
    model, tp = program(arch, world_size)
    [table], [head] = role_weights(tp, Role.VOCAB_PARALLEL), role_weights(tp, Role.COLUMN_GATHERED)
    assert (table == head) == (arch in TIED), (table, head)
    full_table = tp.captured.state[table]
    full_head = model.get_output_embeddings().weight
    counts = balanced_counts(VOCAB, world_size)
    for rank in range(world_size):
        gm = tp.rank_graph(rank)
        rows = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        assert torch.equal(gm.get_parameter(table), full_table[rows])
        assert torch.equal(gm.get_parameter(head), full_head[rows])
        assert all(p.shape[0] != VOCAB for p in gm.parameters()), "a full vocab table is stored on a rank"
        assert state_bytes(gm) == planned_state_bytes(tp, rank)  # a tied table is stored once



class PerLayerTable(torch.nn.Module):
    """Gemma 3n's second table: a smaller vocabulary, looked up by the token ids with those it lacks sent to 0."""

    def __init__(self, vocab: int = 64, small: int = 40, hidden: int = 16):
        super().__init__()
        self.small = small
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.per_layer = torch.nn.Embedding(small, hidden)
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids):
        in_table = torch.logical_and(ids >= 0, ids < self.small)
        return self.head(self.embed(ids) * self.per_layer(torch.where(in_table, ids, 0)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_table_looked_up_by_remapped_token_ids_is_vocab_parallel(world_size):
    torch.manual_seed(0)
    model = PerLayerTable().eval()
    ids = torch.tensor([[0, 5, 39, 40, 63], [12, 41, 2, 38, 1]])  # ids past the small table's end, and its last
    tp = fxtp.compile(model, world_size, example_inputs=(ids,))
    assert sorted(role_weights(tp, Role.VOCAB_PARALLEL)) == ["embed.weight", "per_layer.weight"]
    counts = balanced_counts(40, world_size)
    for rank in range(world_size):
        assert tp.rank_graph(rank).get_parameter("per_layer.weight").shape[0] == counts[rank]
    with torch.no_grad():
        expected = model(ids)
    for out in tp.simulate_ranks(ids):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

def test_padding_row_stays_with_its_rank():
    _, tp = program("opt", 2)  # OPT's embedding has padding_idx=1
    lookups = [[n.args for n in tp.rank_graph(r).graph.nodes if n.target is vocab_parallel_embedding]
               for r in range(2)]
    assert [[args[2:] for args in per_rank] for per_rank in lookups] == [[(0, 256, 1)], [(128, 256, -1)]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_one_all_reduce_for_the_embedding_one_all_gather_for_the_logits(arch, world_size):
    _, tp = program(arch, world_size)
    gm = tp.rank_graph(0)
    by_layer = collectives_by_layer(gm)
    assert by_layer.pop(OUTSIDE_LAYERS) == {"all_reduce": 1, "all_gather": 1}
    assert len(by_layer) == 2 and all(counts == {"all_reduce": 2} for counts in by_layer.values()), by_layer
    source = {n.name: n for n in tp.graph.graph.nodes}  # what each collective moves, in the global graph
    reduced = [source[n.meta[COLLECTIVE]] for n in gm.graph.nodes
               if n.target is collectives.ALL_REDUCE and layer_of(n) == OUTSIDE_LAYERS]
    assert [n.target for n in reduced] == [torch.ops.aten.embedding.default]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.args[0].target is collectives.all_gather_shard
    gathered = source[output.args[0].meta[COLLECTIVE]]
    assert gathered.target is torch.ops.aten.linear.default
    assert [gathered.args[1].meta[STATE]] == role_weights(tp, Role.COLUMN_GATHERED)


@pytest.mark.parametrize("world_size", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow), 8])
def test_llama3_8b_state_per_rank_on_meta(world_size):
    """Llama-3-8B's shape (2 layers) on meta: with embedding and lm_head sharded, every rank
    holds at most 1/N of all state, plus 2% of that share."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(real_config("llama3-8b", layers=2), dtype=torch.bfloat16)
    tp = fxtp.compile(model, world_size)
    total = sum(v.numel() * v.element_size() for v in tp.captured.state.values())
    for rank in range(world_size):
        share = planned_state_bytes(tp, rank) / total
        assert share <= 1.02 / world_size, (rank, share)


def tied_logits(rank, ids, mask):
    """Rank body: a tiny GPT-2 (tied) with an odd vocab, so the logits gather is uneven (128, 127)."""
    gm = fxtp.compile(tiny_model("gpt2", vocab=255), 2).module(rank)
    with torch.no_grad():
        logits = gm(ids, mask)
    return logits, tuple(gm.get_parameter("lm_head.weight").shape)


@pytest.mark.slow  # tied tables are exact in simulate by default (test_models); this adds real processes
def test_tied_model_on_real_processes():
    model = tiny_model("gpt2", vocab=255)
    ids, mask = left_padded_batch(vocab=255)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    outputs = run_ranks(tied_logits, 2, ids, mask)
    assert [shape for _, shape in outputs] == [(128, HIDDEN), (127, HIDDEN)]
    for rank, (logits, _) in enumerate(outputs):
        assert logits.shape == expected.shape
        assert max_abs_diff(logits, expected) <= 1e-4, rank


# by default each bad id at one world size (all three sizes covered); every pair with FXTP_SLOW=1
@pytest.mark.parametrize("bad, world_size", [(bad, size) if (bad, size) in ((256, 1), (10**6, 2), (-1, 3)) else
                                             pytest.param(bad, size, marks=pytest.mark.slow)
                                             for bad in (256, 10**6, -1) for size in (1, 2, 3)])
def test_ids_outside_the_vocabulary_raise_like_hf(world_size, bad):
    """No rank owns such an id: looked up vocab-parallel it would be a zero vector and plausible logits."""
    model = tiny_model("llama", layers=1)
    tp = fxtp.compile(model, world_size)
    ids = torch.tensor([[5, 17, bad, 9]])
    with pytest.raises(IndexError):
        model(input_ids=ids)
    with pytest.raises(IndexError, match=rf"token ids \[{bad}\] are outside the vocabulary \[0, 256\)"):
        tp.simulate(ids)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tp.generate(ids, max_new_tokens=2)


def test_in_a_compiled_step_the_check_is_a_device_assert():
    """Under torch.compile the check is torch._assert_async, which inductor keeps: no host sync."""
    weight = torch.randn(8, 4)
    compiled = torch.compile(lambda w, i: vocab_parallel_embedding(w, i, 0, 8), backend="inductor")
    assert torch.equal(compiled(weight, torch.tensor([[1, 7]])), F.embedding(torch.tensor([[1, 7]]), weight))
    with pytest.raises(RuntimeError):
        compiled(weight, torch.tensor([[1, 8]]))
