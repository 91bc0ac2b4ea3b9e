"""The kernel microbenchmarks on the CPU: benchmarks/attention_latency.py in Triton's interpreter
(and refusing the CPU without it); benchmarks/mlp_latency.py and benchmarks/gemv_latency.py refusing a
machine without a GPU, the weight shapes gemv_latency.py times and its gap kernel's dependent loads."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark_harness import BENCHMARKS, benchmark_module, refusal


@pytest.mark.slow  # Triton's interpreter; the kernel itself is tested by default in test_decode_attention.py
def test_attention_latency_rows_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "attention.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "attention_latency.py"), "--device", "cpu",
               "--dtype", "float32", "--batch", "1,3", "--cache", "64,300", "--ranks", "1,2", "--heads", "4",
               "--kv-heads", "2", "--head-dim", "16", "--layers", "2", "--reps", "1", "--splits", "1,4",
               "--out", str(out)]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["ranks"], row["batch"], row["cache"], row["heads"], row["kv_heads"]) for row in rows] == [
        (n, batch, cache, 4 // n, 2 // n) for n in (1, 2) for batch in (1, 3) for cache in (64, 300)]
    for row in rows:
        assert list(row["us_per_call"]) == ["sdpa", "fxtp", "fxtp/1", "fxtp/4"]
        # 1 to 6 programs: fxtp wants 4 splits of 300 keys, which whole 64-key blocks make 3 of 128
        assert row["splits"] == ({"fxtp": 1, "fxtp/1": 1, "fxtp/4": 1} if row["cache"] == 64 else
                                 {"fxtp": 3, "fxtp/1": 1, "fxtp/4": 3})
        assert max(diff for name, diff in row["max_diff"].items() if name != "sdpa") < 1e-5
        assert all(us > 0 for us in row["us_per_call"].values())


def test_attention_latency_refuses_the_cpu_without_the_interpreter(tmp_path):
    command = [sys.executable, os.path.join(BENCHMARKS, "attention_latency.py"), "--device", "cpu"]
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=environment)
    assert finished.returncode == 2 and "TRITON_INTERPRET=1" in finished.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_mlp_latency_says_it_needs_a_gpu(monkeypatch, capsys):
    assert "no GPU here" in refusal("mlp_latency", monkeypatch, capsys, "--ranks", "1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_gemv_latency_says_it_needs_a_gpu(monkeypatch, capsys):
    assert "no GPU here" in refusal("gemv_latency", monkeypatch, capsys, "--ranks", "2")


def test_gemv_latency_times_a_ranks_weights_as_the_step_merges_them(monkeypatch):
    """Llama-3-8B's weights on one of 2 ranks as the compiled decode step holds them: q|k|v and gate|up
    merged, so each GEMV timed alone reads what the step's GEMV reads."""
    gemv_latency = benchmark_module(monkeypatch, "gemv_latency")
    config = benchmark_module(monkeypatch, "random_model").model_config("llama3-8b", None)
    assert gemv_latency.projections(config, 2) == {"q|k|v": (3072, 4096), "o": (4096, 2048), "gate|up": (14336, 4096),
                                                  "down": (4096, 7168), "lm_head": (64128, 4096)}


def test_gemv_latency_chase_gap_makes_dependent_loads(monkeypatch):
    """The gap kernel that stands in for push's polling: each load's address is the value before
    (in Triton's interpreter here)."""
    pytest.importorskip("triton")
    gemv_latency = benchmark_module(monkeypatch, "gemv_latency")
    gap = gemv_latency.Gap("chase", 5, torch.device("cpu"))
    gap()
    assert gap.out.item() == 5 * 128 // 4  # 5 lines of 128 bytes on
