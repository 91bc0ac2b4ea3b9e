"""benchmarks/inference_test.py on the CPU: fxtp on two gloo processes under torchrun, a tiny Llama;
its rows (token check against HF eager, parameters per rank) and the interval arithmetic behind
--profile's busy time. The GPU numbers of the README come from the same script. (Its HF tp_plan
and DeepSpeed peers need accelerate and deepspeed, which the test install leaves out.)"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def inference_test(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)  # it imports benchmarks/peers.py from beside it
    return importlib.import_module("inference_test")


def test_busy_time_counts_overlapping_kernels_once(inference_test):
    union_length = inference_test.union_length
    assert union_length([]) == 0
    assert union_length([(5, 6), (0, 2), (1, 3), (5.5, 5.75)]) == 4  # [0, 3) and [5, 6)
    assert union_length([(0, 10), (2, 3)]) == 10


def test_inference_test_on_two_cpu_processes(tmp_path, inference_test):
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(BENCHMARKS, "inference_test.py"), "--device", "cpu", "--shape", "tiny:llama",
               "--dtype", "float32", "--batch", "1,2", "--prompt-len", "8", "--gen-len", "8", "--warmup", "1",
               "--trials", "1", "--impl", "fxtp", "--checkpoint-dir", str(tmp_path / "checkpoint"), "--out", str(out)]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(row["impl"], row["batch"]) for row in rows] == [("fxtp", 1), ("fxtp", 2)]
    for row in rows:
        assert row["world_size"] == 2 and row["ranks_identical"]
        assert row["match"] == row["checked"] == 8  # float32: token-exact against HF eager on one process
        assert row["decode_steps"] == 7 and 0 < row["decode_ms"]["p50"] <= row["decode_ms"]["p99"]
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(inference_test.model_config("tiny:llama", None))
    whole_bytes = sum(p.numel() for p in whole.parameters()) * 4
    for row in rows:  # each rank holds about half (norms and the like are replicated)
        assert row["param_bytes"][0] == row["param_bytes"][1]
        assert 0.5 * whole_bytes <= row["param_bytes"][0] < 0.6 * whole_bytes
