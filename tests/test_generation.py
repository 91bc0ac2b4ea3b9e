"""Generation with a sharded static KV cache (fxtp/capture/static_cache.py, fxtp/runtime/generation.py)."""
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import CAUSAL_LMS, tiny_config, tiny_model
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.dump import dump
from fxtp.sharding.layouts import Shard
from fxtp.runtime.generation import generated_sources
from fxtp.runtime.rank_processes import run_ranks
from fxtp.node_meta import LAYOUT
from fxtp.decode.prefill_graph import PrefillGraph
from fxtp.rank_ops.grouped_query import grouped_query_attention
from fxtp.capture.static_cache import CACHE_PREFIX, is_cache_state, supports_static_cache
from fxtp.stats import collectives_by_layer
from fxtp.testing import assert_generates_like_hf, tiny_program

# the list: the Llama family, Mistral, Qwen2/3, Gemma/2, Phi-3, Mixtral
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral")
# transformers' StaticCache does not work with these models' attention code (supports_static_cache)
NO_STATIC_CACHE = tuple(arch for arch in CAUSAL_LMS
                        if not supports_static_cache(AutoModelForCausalLM._model_mapping[type(tiny_config(arch))]))


def left_padded(vocab: int, batch: int = 2, seq: int = 7, padding: int = 3):
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :padding] = 0
    return ids, mask


def cache_layouts(program) -> dict:
    return {n.meta["fxtp.state"]: n.meta[LAYOUT] for n in program.graph.graph.nodes
            if n.op == "placeholder" and n.meta.get("fxtp.state", "").startswith(CACHE_PREFIX)}


# Mistral's tiny model generates as Llama's (no window within its length), Gemma as Gemma-2 with neither
# soft-capping nor sliding windows: both run with FXTP_SLOW=1, and every architecture at 1, 2 and 4 ranks below
LIKE_ANOTHER = ("mistral", "gemma")


@pytest.mark.parametrize("arch, world_size", [pytest.param(arch, 2, marks=pytest.mark.slow) if arch in LIKE_ANOTHER
                                              else (arch, 2) for arch in REQUIRED] + [("llama", 1), ("llama", 4)])
def test_greedy_tokens_equal_hf_generate(arch, world_size):
    model, tp = tiny_program(arch, world_size)
    assert_generates_like_hf(model, world_size, *left_padded(model.config.vocab_size), max_new_tokens=8, program=tp)


@pytest.mark.slow  # in the default suite: test_greedy_tokens_equal_hf_generate (the list at 2 ranks, Llama at 1 and 4)
@pytest.mark.parametrize("arch", sorted(set(CAUSAL_LMS) - set(NO_STATIC_CACHE)))
def test_greedy_tokens_equal_hf_generate_every_architecture(arch):
    for world_size in (1, 2, 4):
        model, tp = tiny_program(arch, world_size)
        assert_generates_like_hf(model, world_size, *left_padded(model.config.vocab_size), program=tp)


def test_kv_cache_is_sharded_on_kv_heads():
    model, tp = tiny_program("llama", 2)  # 4 heads, 2 kv heads
    cached = tp.with_cache(batch_size=2, max_length=256)
    layouts = cache_layouts(cached)
    assert len(layouts) == 2 * model.config.num_hidden_layers
    assert all(isinstance(l, Shard) and l.dim == 1 and l.counts == (1, 1) for l in layouts.values()), layouts
    per_layer = collectives_by_layer(cached.rank_graph(0))
    assert all(dict(c) == {"all_reduce": 2} for layer, c in per_layer.items() if layer.startswith("model.layers"))
    generator = tp.generator(device="cpu")
    generator.generate(*left_padded(model.config.vocab_size), max_new_tokens=2)
    memory = generator.memory()
    full_cache = 2 * model.config.num_hidden_layers * 2 * 2 * 256 * 16 * 4  # k+v, layers, batch, kv heads, len, dim
    assert memory["cache"] == full_cache // 2


def test_kv_heads_fewer_than_ranks_keep_the_cache_whole_and_tokens_exact():
    model, tp = tiny_program("llama", 4)  # 2 kv heads on 4 ranks: k/v replicated, sliced after repeat_kv
    layouts = cache_layouts(tp.with_cache(batch_size=2, max_length=256))
    assert layouts and not any(isinstance(l, Shard) for l in layouts.values())


def test_eos_stops_rows_and_pads_them():
    model, tp = tiny_program("llama", 2)
    ids, mask = left_padded(model.config.vocab_size)
    greedy = tp.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    eos = greedy[0, ids.shape[1] + 2].item()  # row 0's third new token
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    got = tp.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 0).all()


class RecordingStreamer:
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


def test_generation_stops_where_hf_stops_and_streams_the_same_tokens():
    # the loop queues a step before it learns the previous token ended every row; that step is dropped
    model, tp = tiny_program("llama", 2)
    ids, mask = (t[:1] for t in left_padded(model.config.vocab_size))
    eos = tp.generate(ids, mask, max_new_tokens=8, eos_token_id=[])[0, ids.shape[1] + 2].item()
    streamers = {"hf": RecordingStreamer(), "fxtp": RecordingStreamer()}
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, streamer=streamers["hf"])
    got = tp.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, streamer=streamers["fxtp"])
    assert torch.equal(got, expected) and got.shape[1] <= ids.shape[1] + 3
    assert len(streamers["fxtp"].puts) == len(streamers["hf"].puts) == got.shape[1] - ids.shape[1] + 1
    assert all(torch.equal(a, b) for a, b in zip(streamers["fxtp"].puts, streamers["hf"].puts))
    assert streamers["fxtp"].ends == streamers["hf"].ends == 1


def test_sampling_is_seeded():
    model, tp = tiny_program("llama", 2)
    ids, mask = left_padded(model.config.vocab_size)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    first, again = tp.generate(ids, mask, seed=7, **kwargs), tp.generate(ids, mask, seed=7, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, tp.generate(ids, mask, seed=8, **kwargs))
    greedy = tp.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(tp.generate(ids, mask, seed=3, top_k=1, **kwargs), greedy)
    assert torch.equal(tp.generate(ids, mask, seed=3, top_p=1e-6, **kwargs), greedy)


def test_the_first_cache_is_captured_at_its_size_and_every_other_size_shares_one_capture():
    """The first batch size and cache length are exported at their size (fastest); the step for
    every other size is exported and planned once, and each of them only allocates its cache
    (fxtp/capture/static_cache.py). All generate HF's tokens."""
    model = tiny_model("llama")
    tp = fxtp.compile(model, 2)
    ids, mask = left_padded(model.config.vocab_size, batch=3)
    for rows, length in ((3, None), (1, 512), (2, 768)):
        expected = model.generate(ids[-rows:], attention_mask=mask[-rows:], max_new_tokens=6, do_sample=False)
        assert torch.equal(tp.generate(ids[-rows:], mask[-rows:], max_new_tokens=6, max_length=length), expected)
    sizes = {key: (program.graph is tp._cached_step.graph, program.captured.state[f"{CACHE_PREFIX}key_0"].shape)
             for key, program in tp._with_cache.items()}
    assert sizes == {(3, 256): (False, (3, 2, 256, 16)), (1, 512): (True, (1, 2, 512, 16)),
                     (2, 768): (True, (2, 2, 768, 16))}


def test_decode_graph_in_the_dump():
    model, tp = tiny_program("llama", 2)
    text = dump(tp.with_cache(batch_size=1, max_length=256))
    assert "kv_cache.key_0" in text and "index_copy_" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("kv_cache.value_1"))
    assert "S(dim=1" in line and "[1, 1, 256, 16] per rank" in line


def prefill_graph_against_eager_on_rank(rank: int, batch: int, length: int) -> list:
    """Rank body: for prompts of three lengths, the compiled prefill's and the eager step's logits and
    the KV cache each leaves in the buffers it shares with the decode step; and the graphs compiled."""
    import torch.distributed as dist

    model, tp = tiny_program("llama", 2)
    step = tp.with_cache(batch, length).rank_graph(rank, dist.group.WORLD.group_name, torch.device("cpu"))
    cache = [buffer for name, buffer in step.named_buffers() if is_cache_state(name)]
    prefill = PrefillGraph(step, DecodeOptions())
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    results = []
    for prompt in (7, 13, 29):
        ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(prompt))
        inputs = (ids, torch.ones(batch, length, dtype=torch.long), torch.arange(prompt).expand(batch, prompt),
                  torch.arange(prompt))
        for run in (prefill, step):
            for buffer in cache:
                buffer.zero_()
            with torch.no_grad():
                results.append((run(*inputs), [buffer.clone() for buffer in cache]))
    return results, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


@pytest.mark.slow  # inductor on the CPU; test_cuda.py's compiled generation prefills through it on a GPU
def test_prefill_graph_serves_every_prompt_length_with_one_compilation():
    """fxtp/decode/prefill_graph.py on 2 gloo processes: prompts of three lengths through one compilation give
    the eager step's logits (all_reduce and all_gather inside) and write the same KV cache into the
    buffers the decode step shares."""
    for results, graphs in run_ranks(prefill_graph_against_eager_on_rank, 2, 2, 64, timeout=600):
        assert graphs == 1
        for (compiled, compiled_cache), (eager, eager_cache) in zip(results[::2], results[1::2]):
            torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
            assert all(filled.abs().sum() > 0 for filled in compiled_cache)
            for filled, expected in zip(compiled_cache, eager_cache):
                torch.testing.assert_close(filled, expected, atol=1e-5, rtol=0)


def test_the_prefill_drops_the_options_of_the_decode_step_alone(monkeypatch):
    """fxtp/decode/prefill_graph.py is compiled with the user's inductor options, without coordinate
    descent tuning, PDL, one-shot all_reduce, the post-grad pass or any of fxtp's rewrites of the decode
    step, whatever they say: its one rewrite is attention, fxtp::prompt_attention."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(dict(module=module, **kwargs)))
    module = tiny_program("llama", 1)[1].rank_graph(0)
    every_option = resolve(DecodeOptions(coordinate_descent_tuning=True, inductor={"max_autotune": True},
                                         push_all_reduce=True, gemv=True, gemv_push=True,
                                         gemv_blocks={"8x16": [1, 16, 4]}), world_size=2, symmetric_memory=True)
    PrefillGraph(module, every_option)
    assert compiled  # one call per kind of layer region (fxtp/decode/layer_regions.py)
    assert all(call["options"] == {"max_autotune": True} and call["dynamic"] is True for call in compiled)
    ops = {node.target for call in compiled for node in call["module"].graph.nodes if node.op == "call_function"}
    assert ops <= {node.target for node in module.graph.nodes} - {grouped_query_attention} \
        | {torch.ops.fxtp.prompt_attention.default}


def test_generation_errors_say_what_to_do():
    model, tp = tiny_program("llama", 2)
    ids, mask = left_padded(model.config.vocab_size)
    with pytest.raises(ValueError, match="exceed max_length=16"):
        tp.generate(ids, mask, max_new_tokens=10, max_length=16)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        tp.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        tp.generate(ids, mask[:, 1:])
    with pytest.raises(ValueError, match="eos_token_id must be an int"):
        tp.generate(ids, mask, eos_token_id="</s>")
    with pytest.raises(ValueError, match="one rank per process"):
        tp.generator(compile=True)
    _, single = tiny_program("llama", 1)
    with pytest.raises(ValueError, match="pass a CUDA device, or compile=False"):
        single.generator(0, device="cpu", compile=True)
    with pytest.raises(TypeError, match="compile is True, False, an fxtp.DecodeOptions or a dict of its fields"):
        single.generator(0, device="cpu", compile="max-autotune")
    with pytest.raises(RuntimeError, match="torchrun"):
        tp.generator(0)


@pytest.mark.parametrize("arch", NO_STATIC_CACHE)
def test_model_without_static_cache_support_gets_a_clear_error(arch):
    """GPT-Neo's step with a static cache would be captured and generate other tokens than HF's:
    transformers' own flag refuses it before the export."""
    model, tp = tiny_program(arch, 2)
    with pytest.raises(fxtp.CaptureError, match="StaticCache"):
        tp.generate(*left_padded(model.config.vocab_size), max_new_tokens=2)


def generate_on_rank(rank, ids, mask):
    """Rank body: greedy and seeded sampling with this rank's generator over gloo."""
    tp = fxtp.compile(tiny_model("llama"), 2)
    generator = tp.generator(rank)
    greedy = generator.generate(ids, mask, max_new_tokens=8)
    sampled = generator.generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=20, seed=5, eos_token_id=[])
    return greedy, sampled, generator.memory()


@pytest.mark.slow  # by default test_hf_generate.py generates on real processes, through the same Generator
def test_generation_on_real_processes():
    model = tiny_model("llama")
    ids, mask = left_padded(model.config.vocab_size)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    (greedy0, sampled0, memory0), (greedy1, sampled1, memory1) = run_ranks(generate_on_rank, 2, ids, mask)
    assert torch.equal(greedy0, expected) and torch.equal(greedy1, expected)
    assert torch.equal(sampled0, sampled1)
    assert memory0 == memory1 and memory0["cache"] > 0
    assert memory0["parameters"] < sum(p.nbytes for p in model.parameters()) * 0.6


def test_a_dropped_program_leaves_no_generated_sources_behind():
    """torch.fx keeps each GraphModule's source in a global cache it never evicts (about 0.2 MB a graph):
    a program's captures, clean-ups and rank graphs take theirs with them when the program goes."""
    model = tiny_model("llama")
    gc.collect()
    before = generated_sources()
    tp = fxtp.compile(model, 2)
    tp.simulate(torch.tensor([[5, 6, 7]]))
    tp.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert len(generated_sources() - before) > 10  # the check below can fail
    del tp
    gc.collect()
    assert generated_sources() - before == set()
