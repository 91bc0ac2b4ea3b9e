"""benchmarks/pipeline_inference.py, the DeepSpeed AutoTP tutorial's pipeline benchmark with fxtp in
place of deepspeed.init_inference, as a user runs it on the CPU: under torchrun on 2 gloo processes,
and in one process loading a model built on meta from its checkpoint. Both print the seed's latency
block and generate, greedily in float32, the text the unsharded HF pipeline generates. Also: the
seed's percentiles, a real shape's vocab kept to its tiny tokenizer's ids, and --impl deepspeed
without deepspeed."""
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import pipeline

from fxtp.tiny_configs import tiny_config, tiny_model
from fxtp.tiny_tokenizer import save_tiny_pretrained

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "pipeline_inference.py")
RUN = ["--name", "tiny:llama", "--device", "cpu", "--batch_size", "2", "--max_new_tokens", "8", "--greedy",
       "--trials", "2", "--warmup", "1", "--dtype", "float32"]
BLOCK_LINES = ("Avg Latency", "P50 Latency", "P90 Latency", "P95 Latency", "P99 Latency", "P999 Latency")
FIELDS = {"impl", "name", "world_size", "processes", "device", "dtype", "batch_size", "max_new_tokens", "greedy",
          "compile", "use_meta_tensor", "plan", "trials", "warmup", "per_token_ms", "first_token_ms",
          "decode_steps_timed", "tokens_per_trial", "weight_bytes_per_rank", "parameters_per_rank", "avg_bw_gb_s",
          "avg_tflops", "trial_s", "warmup_s", "setup_s", "texts_by_rank", "texts_agree", "weights_digest_by_rank",
          "versions"}


@pytest.fixture(scope="module")
def pipeline_inference():
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module("pipeline_inference")
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture(scope="module")
def unsharded_texts(pipeline_inference, tmp_path_factory):
    """What HF's own pipeline generates greedily from the same tiny model and the same two prompts."""
    directory = save_tiny_pretrained("llama", str(tmp_path_factory.mktemp("reference")))
    pipe = pipeline("text-generation", model=directory, device="cpu", dtype=torch.float32)
    outputs = pipe(list(pipeline_inference.PROMPTS[:2]), do_sample=False, max_new_tokens=8, batch_size=2)
    return [[candidate["generated_text"] for candidate in row] for row in outputs]


def whole_parameters() -> int:
    return sum(p.numel() for p in tiny_model("llama").parameters())


def run_script(tmp_path, launcher: list[str], *options: str) -> tuple[dict, dict[str, float]]:
    """The script's JSON and its printed block ({line name: number}); it must exit 0."""
    out = tmp_path / "result.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread a process: 2 shared cores
    finished = subprocess.run([*launcher, SCRIPT, *RUN, "--out", str(out), *options], cwd=tmp_path,
                              capture_output=True, text=True, timeout=240, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("====== per token latency") == 1, finished.stdout  # rank 0 prints, once
    printed = dict(re.findall(r"^\t(\w[\w ]*?): +([-+.\de]+) ", finished.stdout, flags=re.MULTILINE))
    return json.loads(out.read_text()), {name: float(value) for name, value in printed.items()}


def check_result(result: dict, printed: dict[str, float], world_size: int, unsharded_texts) -> None:
    assert set(result) == FIELDS
    per_token = result["per_token_ms"]
    assert list(per_token) == ["avg", "p50", "p90", "p95", "p99", "p999"]
    assert 0 < per_token["p50"] <= per_token["p90"] <= per_token["p95"] <= per_token["p99"] <= per_token["p999"]
    assert per_token["avg"] > 0 and result["first_token_ms"]["avg"] > 0
    for line, key in zip(BLOCK_LINES, per_token):  # the block shows the JSON's numbers
        assert printed[line] == pytest.approx(per_token[key], abs=0.006)
    assert result["tokens_per_trial"] == [8, 8] and result["decode_steps_timed"] == 14
    seconds = per_token["avg"] / 1e3
    assert result["avg_bw_gb_s"] == pytest.approx(result["weight_bytes_per_rank"] / seconds / 1e9)
    assert result["avg_tflops"] == pytest.approx(2 * result["parameters_per_rank"] * 2 / seconds / 1e12)
    assert printed["Avg BW"] == pytest.approx(result["avg_bw_gb_s"], rel=0.01, abs=0.006)  # printed as 8.2f
    assert printed["Avg flops"] == pytest.approx(result["avg_tflops"], rel=0.01)  # printed as 8.2e
    whole = whole_parameters()
    assert whole / world_size <= result["parameters_per_rank"] < whole / world_size * 1.1  # sharded, not copied
    assert result["world_size"] == world_size and result["texts_agree"]
    for texts in result["texts_by_rank"]:
        assert texts == unsharded_texts


@pytest.mark.slow  # by default test_hf_generate.py runs the README's torchrun + pipeline snippet on 2 CPU processes
def test_two_cpu_processes_under_torchrun(tmp_path, unsharded_texts):
    """The brief's command: fxtp.parallelize starts the gloo group itself, each process runs its
    rank, and both ranks generate the unsharded model's text from the same weights."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result, printed = run_script(tmp_path, launcher)
    check_result(result, printed, 2, unsharded_texts)
    assert result["processes"] == 2 and len(result["texts_by_rank"]) == 2
    assert len(set(result["weights_digest_by_rank"])) == 1


@pytest.mark.slow  # a model on meta read from its checkpoint: by default in test_hf_generate.py
def test_meta_tensor_run_in_one_process(tmp_path, unsharded_texts):
    """--use_meta_tensor: the model is built on meta and fxtp reads its weights from the checkpoint
    directory; world size 1 in a plain `python` process."""
    result, printed = run_script(tmp_path, [sys.executable], "--use_meta_tensor")
    check_result(result, printed, 1, unsharded_texts)
    assert result["use_meta_tensor"] and result["processes"] == 1


# slow: runs every rank in one process and a manual plan; the default tests keep the torchrun ranks
# (test_two_cpu_processes_under_torchrun)
@pytest.mark.slow
def test_ranks_in_lockstep_with_a_manual_plan(tmp_path, unsharded_texts):
    """--world_size 2 in one process, --plan sharding attention only: the MLPs stay whole on each rank."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"*.q_proj": "colwise", "*.k_proj": "colwise", "*.v_proj": "colwise",
                                "*.o_proj": "rowwise"}))
    result, _ = run_script(tmp_path, [sys.executable], "--world_size", "2", "--plan", str(plan))
    assert result["processes"] == 1 and result["texts_by_rank"] == [unsharded_texts]
    assert whole_parameters() / 2 * 1.1 < result["parameters_per_rank"] < whole_parameters()


def test_percentiles_are_the_seeds(pipeline_inference):
    """The seed's print_latency takes the sorted samples' entry at floor((count - 1) * q), in ms."""
    stats = pipeline_inference.latency_stats([seconds / 1e3 for seconds in (7, 1, 10, 3, 2, 9, 4, 8, 6, 5)])
    assert stats == pytest.approx({"avg": 5.5, "p50": 5, "p90": 9, "p95": 9, "p99": 9, "p999": 9})


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_impl_names_the_missing_package(pipeline_inference):
    with pytest.raises(SystemExit, match=r"--impl deepspeed needs the deepspeed package.*pip install deepspeed"):
        pipeline_inference.main(["--name", "tiny:llama", "--device", "cpu", "--impl", "deepspeed"])


def test_a_real_shape_generates_only_ids_its_tiny_tokenizer_has(pipeline_inference, monkeypatch):
    """shape:<name> with a vocab larger than the 256-token tokenizer (here a tiny Llama of 1024 words
    in place of the real shape, with HF's pipeline): every generated id is one the tokenizer has."""
    monkeypatch.setattr(pipeline_inference, "real_config", lambda name: tiny_config("llama", vocab=1024))
    streamed = []

    class RecordingClock(pipeline_inference.TokenClock):
        def put(self, value):
            streamed.append(value)
            super().put(value)
    monkeypatch.setattr(pipeline_inference, "TokenClock", RecordingClock)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: a second thread on 2 shared cores makes steps 10x slower
    try:
        result = pipeline_inference.main(["--name", "shape:llama3-8b", "--impl", "hf", "--device", "cpu", "--dtype",
                                          "float32", "--batch_size", "2", "--max_new_tokens", "6", "--trials", "2",
                                          "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    assert result["tokens_per_trial"] == [6, 6]
    generated = torch.stack(streamed[1:7] + streamed[8:])  # after each trial's prompt
    assert generated.shape == (12, 2) and int(generated.max()) < 256
