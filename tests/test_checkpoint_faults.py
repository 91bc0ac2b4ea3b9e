"""Checkpoints that are wrong, broken or hostile: each ends in a CheckpointError that names the file or
tensor and says what to do, within seconds, and nothing outside the checkpoint directory is opened."""
import json
import faulthandler
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.runtime.checkpoint import CheckpointError
from fxtp.tiny_configs import tiny_config, tiny_model


@pytest.fixture(autouse=True)
def bounded():
    """A fault that hangs (a FIFO opened for reading blocks inside safetensors' native code, where no
    Python signal handler runs) ends the test process after 60 s with every thread's traceback."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def llama():
    """(tiny llama, its state as saved, the program compiled on meta over 2 ranks)."""
    model = tiny_model("llama", layers=1)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return model, state, fxtp.compile(meta, 2)


def saved(tmp_path, state: dict, index: dict = None) -> str:
    """A checkpoint directory: `state` in one file, with `index` as model.safetensors.index.json."""
    save_file(state, str(tmp_path / "model-1.safetensors"))
    if index is None:
        index = {"weight_map": {name: "model-1.safetensors" for name in state}}
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        f.write(index if isinstance(index, str) else json.dumps(index))
    return str(tmp_path)


def load(tp, path):
    return tp.rank_graph(0, device="cpu", checkpoint=path)


def test_a_good_checkpoint_loads(llama, tmp_path):
    """The baseline the faults below break: the same files, unbroken, load without a warning."""
    _, state, tp = llama
    load(tp, saved(tmp_path, state))


@pytest.mark.parametrize("file", ["../../../../x.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_naming_files_outside_the_directory(llama, tmp_path, file):
    _, state, tp = llama
    outside = tmp_path / "x.safetensors"
    save_file(state, str(outside))
    index = {"weight_map": {name: file for name in state}}
    path = tmp_path / "ckpt"
    path.mkdir()
    with pytest.raises(CheckpointError, match="lies outside the checkpoint directory"):
        load(tp, saved(path, state, index))


def test_index_naming_a_fifo(llama, tmp_path):
    _, state, tp = llama
    os.mkfifo(tmp_path / "pipe.safetensors")
    index = {"weight_map": {name: "pipe.safetensors" for name in state}}
    with pytest.raises(CheckpointError, match="'pipe.safetensors', which is not a regular file"):
        load(tp, saved(tmp_path, state, index))


def test_index_naming_a_missing_file(llama, tmp_path):
    _, state, tp = llama
    index = {"weight_map": {name: "model-2.safetensors" for name in state}}
    with pytest.raises(CheckpointError, match="'model-2.safetensors', which does not exist"):
        load(tp, saved(tmp_path, state, index))


@pytest.mark.parametrize("index, message", [
    ("{not json", "is not valid JSON"),
    ({"metadata": {}}, r"has no \"weight_map\".*got NoneType"),
    ({"weight_map": ["model-1.safetensors"]}, r"has no \"weight_map\".*got list"),
    ([1, 2], r"has no \"weight_map\""),
])
def test_malformed_index(llama, tmp_path, index, message):
    _, state, tp = llama
    with pytest.raises(CheckpointError, match=message) as error:
        load(tp, saved(tmp_path, state, index))
    assert "model.safetensors.index.json" in str(error.value)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupted_safetensors_names_the_file(llama, tmp_path, damage):
    _, state, tp = llama
    path = saved(tmp_path, state)
    file = tmp_path / "model-1.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="model-1.safetensors is not a readable safetensors file"):
        load(tp, path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_or_bool_tensors_are_not_cast_to_float(llama, tmp_path, dtype):
    _, state, tp = llama
    name = "model.layers.0.mlp.up_proj.weight"
    broken = dict(state, **{name: (state[name] * 10).to(dtype)})
    with pytest.raises(CheckpointError, match=f"'{name}' is {dtype} but the model's is torch.float32"):
        load(tp, saved(tmp_path, broken))


def test_a_checkpoint_with_biases_the_model_lacks(tmp_path):
    """A Qwen2 checkpoint (q/k/v biases) into a Llama config of the same shapes: the biases would be
    dropped silently and the result would be neither model."""
    qwen2 = tiny_model("qwen2", layers=1)
    qwen2.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama", layers=1))
    tp = fxtp.compile(meta, 2)
    with pytest.raises(CheckpointError, match=r"tensors the model's modules do not have: \['model.layers.0.self_attn.k_proj.bias'"):
        load(tp, str(tmp_path))


def test_other_unused_tensors_are_named_in_a_warning(llama, tmp_path):
    _, state, tp = llama
    extra = dict(state, **{"optimizer_step": torch.zeros(1), "value_head.weight": torch.zeros(2, 2)})
    with pytest.warns(UserWarning, match=r"does not use, left unread: \['optimizer_step', 'value_head.weight'\]"):
        load(tp, saved(tmp_path, extra))


def test_a_tied_checkpoint_has_no_leftovers(tmp_path, recwarn):
    """HF saves tied weights once; a checkpoint that stores both names is no leftover either."""
    model = tiny_model("gpt2", layers=1)
    model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("gpt2", layers=1))
    load(fxtp.compile(meta, 2), str(tmp_path))
    assert not [w for w in recwarn if "does not use" in str(w.message)]


def test_the_program_owns_its_weights():
    """Changing the model after compile reaches no rank graph made before, whatever the weight's layout
    (replicated, column-, row- or vocab-parallel): the program computes the model as it was compiled."""
    model = tiny_model("llama", layers=1)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        tp = fxtp.compile(model, 2)
        tp.simulate(ids)  # makes the rank graphs
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"):
            model.get_parameter(name).mul_(3)
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-2
        assert (tp.simulate(ids) - before).abs().max() < 1e-5
