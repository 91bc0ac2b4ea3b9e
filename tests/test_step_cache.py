"""fxtp/runtime/step_cache.py: a later program (or process) generates from the rank graphs an earlier one
saved, with the same tokens and without exporting or planning the step; whatever the graph is made
of (config, the code the model runs, world size) changes the key, and weights are never cached."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.fx as fx
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import fxtp
import fxtp.runtime.program as program
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.decode.options import DecodeOptions, resolve
from fxtp.progress import LOGGER
from fxtp.runtime import step_cache
from fxtp.tiny_configs import tiny_config, tiny_model

PROMPT = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(4))
MASK = torch.ones_like(PROMPT)
MASK[0, :2] = 0  # row 0 left-padded
captured_steps = []


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The step cache on, in a directory of its own, and every capture of a step counted."""
    directory = tmp_path / "steps"
    monkeypatch.setenv("FXTP_CACHE_DIR", str(directory))
    capture = program.capture_cached
    captured_steps.clear()
    monkeypatch.setattr(program, "capture_cached", lambda *a, **k: captured_steps.append(a[1:]) or capture(*a, **k))
    return directory


def generated(model, world_size: int, batch: int = 2, **options) -> torch.Tensor:
    tp = fxtp.compile(model, world_size, capture_on_first_use=True)
    return tp.generate(PROMPT[:batch], attention_mask=MASK[:batch], max_new_tokens=6, **options)


@pytest.mark.parametrize("arch, world_size", [("llama", 2), ("phi3", 3), ("gpt2", 1)])  # phi3: fused qkv, gpt2: tied
def test_a_new_program_generates_the_same_tokens_without_capturing(cache_dir, arch, world_size):
    model = tiny_model(arch, noise=0.05)
    first = generated(model, world_size)
    assert len(captured_steps) == 1 and len(list(cache_dir.glob("*.pkl"))) == world_size  # a graph a rank
    again = generated(model, world_size)
    assert len(captured_steps) == 1, "the second program captured the step again"
    assert torch.equal(again, first)
    assert torch.equal(first, model.generate(PROMPT, attention_mask=MASK, max_new_tokens=6, do_sample=False))


def test_hf_generate_of_a_parallelized_model_reads_them_too(cache_dir):
    model = tiny_model("llama", noise=0.05)
    first, again = (fxtp.parallelize(model, 2).generate(PROMPT, attention_mask=MASK, max_new_tokens=6,
                                                         do_sample=False) for _ in range(2))
    assert len(captured_steps) == 1 and torch.equal(again, first)


def test_every_cache_size_is_kept_the_symbolic_steps_too(cache_dir):
    model = tiny_model("llama", noise=0.05)

    def both_sizes() -> list[torch.Tensor]:  # a program's second size is the symbolic step's
        tp = fxtp.compile(model, 2, capture_on_first_use=True)
        return [tp.generate(PROMPT[:batch], attention_mask=MASK[:batch], max_new_tokens=6) for batch in (2, 1)]

    first = both_sizes()
    assert [len(size) for size in captured_steps] == [1, 0]  # (key,), then the symbolic capture: no size
    assert len(list(cache_dir.glob("*.pkl"))) == 4
    again = both_sizes()
    assert len(captured_steps) == 2 and all(torch.equal(a, b) for a, b in zip(again, first))


def test_weights_come_from_the_checkpoint_of_a_meta_model(cache_dir, tmp_path):
    model = tiny_model("llama", noise=0.05)
    model.save_pretrained(tmp_path / "checkpoint")

    def from_checkpoint() -> torch.Tensor:
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
        tp = fxtp.compile(meta, 2, capture_on_first_use=True)
        generator = tp.generator(device="cpu", checkpoint=str(tmp_path / "checkpoint"))
        return generator.generate(PROMPT, attention_mask=MASK, max_new_tokens=6)

    first = from_checkpoint()
    again = from_checkpoint()
    assert len(captured_steps) == 1
    # the model in memory: its own graph (captured on another device), the same tokens
    assert torch.equal(again, first) and torch.equal(first, generated(model, 2)) and len(captured_steps) == 2


def test_the_same_model_saved_and_loaded_again_reads_them(cache_dir, tmp_path):
    """save_pretrained writes where the config came from (its `architectures`): not part of the key."""
    model = tiny_model("llama", noise=0.05)
    first = generated(model, 2)
    model.save_pretrained(tmp_path / "checkpoint")
    again = generated(AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint"), 2)
    assert len(captured_steps) == 1 and torch.equal(again, first)


def test_new_weights_of_the_same_model_are_read_not_cached(cache_dir):
    first_model, second_model = tiny_model("llama", noise=0.05), tiny_model("llama", seed=1, noise=0.05)
    first, second = generated(first_model, 2), generated(second_model, 2)
    assert len(captured_steps) == 1  # the same graph: the second model's weights go into it
    assert not torch.equal(first, second)
    assert torch.equal(second, second_model.generate(PROMPT, attention_mask=MASK, max_new_tokens=6, do_sample=False))


def test_another_config_or_world_size_is_captured_again(cache_dir):
    config = tiny_config("llama")
    config.rms_norm_eps = 0.25  # no shape changes
    generated(tiny_model("llama"), 2)
    generated(AutoModelForCausalLM.from_config(config), 2)
    generated(tiny_model("llama"), 1)
    generated(tiny_model("llama").to(torch.bfloat16), 2)
    assert len(captured_steps) == 4


def test_code_patched_at_run_time_is_captured_again(cache_dir, monkeypatch):
    """A patch of a HF module (as fused-kernel libraries make) is a new graph: never the old one's tokens."""
    model = tiny_model("llama", noise=0.05)
    plain = generated(model, 2)
    forward = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: forward(self, x) * 3)
    patched = generated(model, 2)
    assert len(captured_steps) == 2 and not torch.equal(plain, patched)
    assert torch.equal(patched, model.generate(PROMPT, attention_mask=MASK, max_new_tokens=6, do_sample=False))


def test_an_unreadable_file_is_logged_and_written_again(cache_dir, caplog):
    model = tiny_model("llama", noise=0.05)
    first = generated(model, 2)
    for path in cache_dir.glob("*.pkl"):
        path.write_bytes(b"not a pickle")
    LOGGER.addHandler(caplog.handler)
    try:
        again = generated(model, 2)
    finally:
        LOGGER.removeHandler(caplog.handler)
    assert torch.equal(again, first) and len(captured_steps) == 2
    assert sum("could not be read" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2
    assert torch.equal(generated(model, 2), first) and len(captured_steps) == 2  # written anew


def test_the_decode_passes_make_the_same_step_of_a_graph_read_back(cache_dir, monkeypatch):
    model = tiny_model("llama")
    fresh, read_back = (fxtp.compile(model, 2, capture_on_first_use=True).with_cache(1, 256).rank_graph(0)
                        for _ in range(2))
    assert len(captured_steps) == 1 and read_back.code == fresh.code
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module))
    options = resolve(DecodeOptions(), 2, symmetric_memory=True)
    for module in (fresh, read_back):
        DecodeGraph(module, options)
    assert compiled[0].code == compiled[1].code


def test_another_process_reads_what_this_one_saved(cache_dir):
    """The key is the same in a process with another hash seed (no address or set order in it), and
    in one that made no model with weights before."""
    model = tiny_model("llama", noise=0.05)
    first = generated(model, 2)
    script = ("import torch, transformers, fxtp, fxtp.runtime.program as p\n"
              "from fxtp.runtime.step_cache import model_code_digest\n"
              "from fxtp.tiny_configs import tiny_config, tiny_model\n"
              # no model with weights made before: transformers then gives nn.Module a method (smart_apply)
              "with torch.device('meta'):\n"
              "    print(model_code_digest(transformers.AutoModelForCausalLM.from_config(tiny_config('llama'))))\n"
              "def refuse(*a, **k): raise SystemExit('captured again')\n"
              "p.capture_cached = refuse\n"
              f"ids, mask = torch.tensor({PROMPT.tolist()}), torch.tensor({MASK.tolist()})\n"
              "tp = fxtp.compile(tiny_model('llama', noise=0.05), 2, capture_on_first_use=True)\n"
              "print(tp.generate(ids, attention_mask=mask, max_new_tokens=6).tolist())\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "FXTP_VERBOSITY": "warning"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    digest, tokens = done.stdout.strip().splitlines()[-2:]
    assert digest == step_cache.model_code_digest(model) and tokens == str(first.tolist())


def test_off_where_the_directory_is_set_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("FXTP_CACHE_DIR", "")
    assert step_cache.cache_directory() is None
    monkeypatch.delenv("FXTP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert step_cache.cache_directory() == tmp_path / "fxtp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert step_cache.cache_directory() == tmp_path / "home" / ".cache" / "fxtp"


def test_a_graph_calling_what_cannot_be_imported_back_is_not_saved(cache_dir):
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(lambda t: t + 1, (x,)))
    module = fx.GraphModule(torch.nn.Module(), graph)
    step_cache.write("key", lambda: step_cache.saved_rank_graph(module, {}, {}, frozenset()))
    assert step_cache.read("key") is None and not list(cache_dir.glob("*"))
