"""fxtp.parallelize: HF's own generate() and pipeline() drive the sharded model, and give the unsharded
model's tokens (fxtp/runtime/parallelize.py, fxtp/runtime/hf_model.py, fxtp/runtime/sharded_cache.py)."""
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings, strategies as st

import fxtp
import fxtp.runtime.program as program
from fxtp.capture.export import capture
from fxtp.runtime.rank_agreement import RanksDisagree
from fxtp.runtime.rank_processes import RankFailure, run_ranks
from fxtp.runtime.sharded_cache import CacheTakenOver
from fxtp.tiny_configs import CAUSAL_LMS, tiny_model
from fxtp.tiny_tokenizer import save_tiny_pretrained

# the list: text-generation for these, generate() for the encoder-decoders (transformers 5
# removed the text2text-generation pipeline)
CAUSAL = ("llama", "qwen2", "mistral", "gemma2", "phi3", "mixtral")
SEQ2SEQ = ("t5", "bart")
# every other architecture whose static cache works in transformers (FXTP_SLOW=1)
EVERY_OTHER = tuple(sorted(set(CAUSAL_LMS) - set(CAUSAL) - {"gpt_neo", "mpt"}))
# HF's generate and beam search at 2 ranks: a causal LM and an encoder-decoder by default, the rest with
# FXTP_SLOW=1 (Mixtral's greedy tokens against HF's generate stay default in test_generation.py)
DEFAULT = {("llama", 2), ("t5", 2)}


@lru_cache(maxsize=None)
def parallel(arch: str, world_size: int):
    model = tiny_model(arch, noise=0.05)
    return model, fxtp.parallelize(model, world_size)


def prompts(batch: int = 2, seq: int = 7, padding: int = 3):
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[-1, :padding] = 0
    return ids, mask


def generated_alike(model, sharded, seed: int = 0, **options) -> torch.Tensor:
    ids, mask = prompts()
    torch.manual_seed(seed)
    expected = model.generate(ids, attention_mask=mask, **options)
    torch.manual_seed(seed)
    got = sharded.generate(ids, attention_mask=mask, **options)
    assert torch.equal(got, expected), f"{options}\nfxtp: {got.tolist()}\nHF:   {expected.tolist()}"
    return got


@pytest.mark.parametrize("arch, world_size", [
    (arch, size) if (arch, size) in DEFAULT else pytest.param(arch, size, marks=pytest.mark.slow)
    for arch in CAUSAL + SEQ2SEQ + EVERY_OTHER for size in (1, 2, 4)])
def test_greedy_and_beam_search_equal_hf(arch, world_size):
    model, sharded = parallel(arch, world_size)
    generated_alike(model, sharded, max_new_tokens=8, do_sample=False)
    generated_alike(model, sharded, max_new_tokens=6, num_beams=3, do_sample=False)


@pytest.mark.parametrize("arch", ["llama", pytest.param("t5", marks=pytest.mark.slow)])
def test_seeded_sampling_equals_hf(arch):
    model, sharded = parallel(arch, 2)
    for seed in (0, 1):
        generated_alike(model, sharded, seed, max_new_tokens=8, do_sample=True, top_k=50, top_p=0.9, temperature=0.8)


GENERATION_OPTIONS = st.fixed_dictionaries({
    "do_sample": st.booleans(),
    "temperature": st.sampled_from([0.5, 1.0, 1.5]),
    "top_k": st.sampled_from([None, 5, 50]),
    "top_p": st.sampled_from([None, 0.5, 0.95]),
    "repetition_penalty": st.sampled_from([None, 1.3]),
    "no_repeat_ngram_size": st.sampled_from([None, 2]),
    "min_new_tokens": st.integers(0, 4),
    "max_new_tokens": st.integers(1, 10),
    "eos_token_id": st.sampled_from([None, 7, [7, 11, 40]]),
    "num_beams": st.integers(1, 4),
})


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=GENERATION_OPTIONS, seed=st.integers(0, 1000))
def test_generation_config_options_equal_hf(options, seed):
    """Drawn GenerationConfig options give the unsharded model's tokens, at 2 ranks."""
    generated_with_options_alike(options, seed)


@pytest.mark.slow  # more draws of test_generation_config_options_equal_hf, which runs by default
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(options=GENERATION_OPTIONS, seed=st.integers(0, 1000))
def test_generation_config_options_equal_hf_more_draws(options, seed):
    generated_with_options_alike(options, seed)


def generated_with_options_alike(options: dict, seed: int) -> None:
    model, sharded = parallel("llama", 2)
    options = {name: value for name, value in options.items() if value is not None}
    if not options["do_sample"]:
        options = {name: value for name, value in options.items() if name not in ("temperature", "top_k", "top_p")}
    generated_alike(model, sharded, seed, pad_token_id=0, **options)


def test_logits_processors_stopping_criteria_and_streamer_are_hf_s():
    model, sharded = parallel("llama", 2)
    ids, mask = prompts()

    class Streamer:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.puts.append("end")

    options = dict(max_new_tokens=10, do_sample=False,
                   logits_processor=transformers.LogitsProcessorList([transformers.SuppressTokensLogitsProcessor([58])]),
                   stopping_criteria=transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(12)]))
    streams = []
    for generating in (model, sharded):
        streams.append(Streamer())
        out = generating.generate(ids[:1], attention_mask=mask[:1], streamer=streams[-1], **options)
        assert out.shape[1] == 12 and 58 not in out[0, 7:].tolist()
    assert streams[0].puts == streams[1].puts


@pytest.mark.parametrize("arch", [arch if arch == "llama" else pytest.param(arch, marks=pytest.mark.slow)
                                  for arch in CAUSAL])
def test_the_seed_pipeline_lines_with_only_the_init_line_changed(tmp_path, arch):
    """pipeline("text-generation"), then `pipe.model = fxtp.parallelize(pipe.model, 2)` where the seed has
    deepspeed.init_inference: the same text, greedy and seeded sampling (the pipeline's default)."""
    path = save_tiny_pretrained(arch, str(tmp_path / arch))
    inputs = ["Hello, my name is", "The quick brown fox"]
    texts = []
    for parallelize in (False, True):
        pipe = transformers.pipeline("text-generation", model=path, device="cpu")
        if parallelize:
            pipe.model = fxtp.parallelize(pipe.model, 2)
        greedy = pipe(inputs, max_new_tokens=8, do_sample=False)
        torch.manual_seed(0)
        texts.append((greedy, pipe(inputs, max_new_tokens=8), pipe(inputs[0], max_new_tokens=5, num_beams=2,
                                                                  do_sample=False),
                      pipe(inputs[0], max_new_tokens=12, do_sample=False, stop_strings=["ee"], tokenizer=pipe.tokenizer)))
    assert texts[0] == texts[1]
    assert texts[0][0] != texts[0][1]  # sampling drew other tokens than greedy: the comparison can fail


def test_forward_without_a_cache_gives_the_full_logits():
    model, sharded = parallel("llama", 2)
    ids, mask = prompts()
    out = sharded(ids, attention_mask=mask)
    assert out.logits.shape == (2, 7, 256)
    assert (out.logits - model(ids, attention_mask=mask).logits).abs().max() < 1e-5


def test_generating_never_captures_the_forward_without_a_cache(monkeypatch):
    """fxtp.parallelize checks its arguments at once, but exports only what is run: generate() captures
    the step with a KV cache, and the forward without one is captured at its first call."""
    captures = []
    monkeypatch.setattr(program, "capture", lambda model: captures.append(model) or capture(model))
    with pytest.raises(ValueError, match="larger than the model's 4 attention heads"):
        fxtp.parallelize(tiny_model("llama"), 8)
    model = tiny_model("llama", noise=0.05)
    sharded = fxtp.parallelize(model, 2)
    generated_alike(model, sharded, max_new_tokens=4)
    assert captures == []
    ids, mask = prompts()
    assert (sharded(ids, attention_mask=mask).logits - model(ids, attention_mask=mask).logits).abs().max() < 1e-5
    assert captures == [model]


def test_options_fxtp_cannot_honour_are_refused():
    model, sharded = parallel("llama", 2)
    ids, mask = prompts()
    with pytest.raises(ValueError, match="output_attentions.*returns logits only"):
        sharded.generate(ids, attention_mask=mask, output_attentions=True, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="assistant_model=LlamaForCausalLM.*rolls the cache back"):
        sharded.generate(ids, attention_mask=mask, assistant_model=model)
    with pytest.raises(ValueError, match="cache_implementation='offloaded'.*leave cache_implementation unset"):
        sharded.generate(ids, attention_mask=mask, cache_implementation="offloaded")
    with pytest.raises(ValueError, match="inputs_embeds are not supported"):
        sharded.generate(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match=r"does not take \['labels'\]"):
        sharded(ids, labels=ids)
    with pytest.raises(TypeError, match="takes only a cache an fxtp model returned, not a DynamicCache"):
        sharded(ids, **{transformers_cache_argument(model): transformers.DynamicCache()})


def transformers_cache_argument(model) -> str:
    from fxtp.capture.static_cache import cache_argument
    return cache_argument(model)


def test_models_that_cannot_generate_are_refused():
    with pytest.raises(TypeError, match="a HF model that can generate.*got BertForMaskedLM"):
        fxtp.parallelize(tiny_model("bert"), 2)


def test_an_older_cache_used_after_a_newer_generation_started_is_refused():
    model, sharded = parallel("llama", 2)
    ids, mask = prompts()
    key = transformers_cache_argument(model)
    first = sharded(ids, attention_mask=mask, **{key: new_cache(sharded)})
    sharded.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(CacheTakenOver, match="one KV cache at a time"):
        sharded(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **{key: getattr(first, cache_field(first))})


def new_cache(sharded):
    from fxtp.runtime.sharded_cache import ShardedCache
    return ShardedCache(sharded.config, sharded.fxtp_runtime.generator, 256)


def cache_field(output) -> str:
    return "cache" if "cache" in output else "past_key_values"


# --- one process per rank (gloo): every rank gets the same tokens --------------------------------------

def _pipeline_on_a_rank(rank: int, path: str) -> tuple:
    pipe = transformers.pipeline("text-generation", model=path, device="cpu")
    pipe.model = fxtp.parallelize(pipe.model)  # world size and rank from the process group
    greedy = pipe(["Hello, my name is", "The quick"], max_new_tokens=6, do_sample=False)
    torch.manual_seed(rank)  # differently seeded ranks: the generator shares rank 0's random state
    sampled = pipe("Hello, my name is", max_new_tokens=6)
    return greedy, sampled


def _seq2seq_on_a_rank(rank: int) -> torch.Tensor:
    ids, mask = prompts()
    return fxtp.parallelize(tiny_model("t5", noise=0.05)).generate(ids, attention_mask=mask, max_new_tokens=6,
                                                                   num_beams=2, do_sample=False)


def _disagreeing_rank(rank: int) -> torch.Tensor:
    ids, mask = prompts()
    return fxtp.parallelize(tiny_model("llama", noise=0.05)).generate(ids, attention_mask=mask,
                                                                      max_new_tokens=4 + rank)


def test_every_rank_of_real_processes_gets_the_unsharded_tokens(tmp_path):
    path = save_tiny_pretrained("llama", str(tmp_path / "llama"))
    ranks = run_ranks(_pipeline_on_a_rank, 2, path, timeout=240)
    pipe = transformers.pipeline("text-generation", model=path, device="cpu")
    greedy = pipe(["Hello, my name is", "The quick"], max_new_tokens=6, do_sample=False)
    torch.manual_seed(0)
    assert ranks == [(greedy, pipe("Hello, my name is", max_new_tokens=6))] * 2


@pytest.mark.slow  # the encoder-decoder path on real processes; in one process by default
def test_t5_beam_search_on_real_processes():
    ids, mask = prompts()
    expected = tiny_model("t5", noise=0.05).generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2,
                                                     do_sample=False)
    assert all(torch.equal(tokens, expected) for tokens in run_ranks(_seq2seq_on_a_rank, 2, timeout=240))


# ranks given different generate() arguments by default: test_rank_faults.py's disagreements (the same
# check_ranks_agree on real processes) and test_ranks_compare_generate_arguments_by_value (what parallelize compares)
@pytest.mark.slow
def test_ranks_given_different_generation_arguments_are_told_so():
    with pytest.raises(RankFailure, match=r"(?s)RanksDisagree.*max_new_tokens: rank 0 has 4; rank 1 has 5"):
        run_ranks(_disagreeing_rank, 2, timeout=240)
    assert issubclass(RanksDisagree, RuntimeError)


def test_the_readme_torchrun_snippet_on_two_cpu_processes(tmp_path):
    """README's fxtp.parallelize snippet, as written, under torchrun on 2 CPU processes: parallelize
    starts the (gloo) process group itself, and both ranks print the unsharded pipeline's text."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### In HF's `pipeline()` and `generate()`"):]
    snippet = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python\n") + 10)]
    script = tmp_path / "run.py"
    script.write_text(snippet)
    path = save_tiny_pretrained("llama", str(tmp_path / "llama"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), path],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    expected = transformers.pipeline("text-generation", model=path, device="cpu")(
        "Hello, my name is", max_new_tokens=20, do_sample=False)
    assert run.stdout.count(str(expected)) == 2, run.stdout  # the two ranks' lines may interleave


def test_a_model_on_meta_reads_its_slices_from_the_checkpoint(tmp_path):
    path = save_tiny_pretrained("llama", str(tmp_path / "llama"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.device("meta"):
        empty = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    sharded = fxtp.parallelize(empty, 2, checkpoint=path)
    assert sharded.device == torch.device("cpu")
    ids, mask = prompts()
    assert torch.equal(sharded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                       loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    assert (sharded(ids, attention_mask=mask).logits - loaded(ids, attention_mask=mask).logits).abs().max() < 1e-5


def test_ranks_compare_generate_arguments_by_value():
    """What the ranks all-gather: equal for equal arguments made apart (no object ids), unequal where
    a field differs; a GenerationConfig that generate has put tensors into still compares."""
    from fxtp.runtime.hf_model import fingerprint

    def arguments(tokens: int):
        config = transformers.GenerationConfig(max_new_tokens=tokens)
        config._eos_token_tensor = torch.tensor([2])
        return fingerprint((torch.ones(1, 3, dtype=torch.long),), dict(
            generation_config=config, streamer=object(), logits_processor=transformers.LogitsProcessorList()))
    assert str(arguments(3)) == str(arguments(3)) and str(arguments(3)) != str(arguments(4))
    assert "streamer" not in arguments(3)


def test_a_program_compiled_to_capture_on_first_use_generates_without_the_forward(monkeypatch):
    """fxtp.compile(..., capture_on_first_use=True) checks its arguments at once; its generator captures
    only the step with a KV cache, and dump or simulate capture the forward when first called."""
    captures = []
    monkeypatch.setattr(program, "capture", lambda model: captures.append(model) or capture(model))
    with pytest.raises(ValueError, match="larger than the model's 4 attention heads"):
        fxtp.compile(tiny_model("llama"), 8, capture_on_first_use=True)
    with pytest.raises(ValueError, match="training is captured now"):
        fxtp.compile(tiny_model("llama"), 2, training=True, capture_on_first_use=True)
    model = tiny_model("llama", noise=0.05)
    tp = fxtp.compile(model, 2, capture_on_first_use=True)
    ids, mask = prompts()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(tp.generate(ids, attention_mask=mask, max_new_tokens=4), expected)
    assert captures == []
    assert "column-parallel" in fxtp.dump(tp) and captures == [model]
    assert (tp.simulate(ids, attention_mask=mask) - model(ids, attention_mask=mask).logits).abs().max() < 1e-5
