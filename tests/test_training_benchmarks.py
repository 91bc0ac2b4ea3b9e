"""benchmarks/training_memory.py on a tiny Llama (a rank's bytes at TP=2 against one process) and
benchmarks/training_speed.py on the CPU (HF eager against fxtp's rank module at N=1), and the impl
names training_speed.py takes at a world size."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark_harness import BENCHMARKS, benchmark_module
from fxtp.tiny_configs import tiny_model


@pytest.mark.slow  # by default test_training.py checks the shards, their gradients and the optimizer over DTensors
def test_training_memory_halves_each_ranks_bytes_at_two_ranks(tmp_path):
    """benchmarks/training_memory.py at a tiny Llama: one AdamW step at TP=2 on gloo processes against the
    HF model on one process. Each rank's parameters, gradients and AdamW state are about half of the one
    process's (only the norms are replicated), together all of them, and the loss is the same."""
    out = tmp_path / "memory.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "training_memory.py"), "--hidden", "64", "--layers", "2",
               "--heads", "4", "--kv-heads", "2", "--intermediate", "128", "--vocab", "256", "--seq", "16",
               "--out", str(out)]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(out.read_text())
    one, ranks = result["one_process"], result["ranks"]
    assert result["world_size"] == 2 and [row["rank"] for row in ranks] == [0, 1]
    with torch.device("meta"):
        whole = sum(p.numel() for p in tiny_model("llama").parameters())
    assert result["model"]["parameters"] == whole and one["param_bytes"] == 4 * whole
    for row in [one, *ranks]:
        assert row["without_grad"] == 0 and row["grad_bytes"] == row["param_bytes"]
        # exp_avg and exp_avg_sq like the parameter, and a float32 step count for each
        assert row["optimizer_bytes"] == 2 * row["param_bytes"] + 4 * row["parameters"]
        assert row["total_bytes"] == row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
        assert row["peak_rss_mb"] > 0
        assert row["step_peak_rss_mb"] is None or row["step_peak_rss_mb"] <= row["peak_rss_mb"]
    assert one["param_bytes"] < sum(row["param_bytes"] for row in ranks) < 1.01 * one["param_bytes"]
    for row in ranks:
        assert row["ratio"] == row["total_bytes"] / one["total_bytes"]
        assert 0.5 < row["ratio"] < 0.6  # 0.5015 here: the replicated norms weigh more in a tiny model
        assert row["loss_diff"] <= 1e-5
    assert result["max_ratio"] == max(row["ratio"] for row in ranks)
    assert f"largest rank / 1 process: {result['max_ratio']:.4f}" in finished.stdout


@pytest.mark.slow  # by default test_training.py checks the rank module's losses and gradients against HF's
def test_training_speed_on_the_cpu(tmp_path):
    """benchmarks/training_speed.py on the CPU, a tiny Llama in float32, HF eager and fxtp's rank module at
    N=1: the same weights and batch give the same losses over the steps; the JSON's timing fields."""
    out = tmp_path / "speed.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "training_speed.py"), "--device", "cpu", "--shape",
               "tiny:llama", "--layers", "2", "--dtype", "float32", "--batch", "2", "--seq", "16", "--warmup", "1",
               "--steps", "2", "--impl", "hf-eager,fxtp-n1", "--out", str(out)]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["shape"], result["layers"], result["batch"], result["seq"], result["world_size"]) == \
        ("tiny:llama", 2, 2, 16, 1)
    rows = result["results"]
    assert [(row["impl"], row["world_size"], row["compiled"]) for row in rows] == [("hf-eager", 1, False),
                                                                                    ("fxtp-n1", 1, False)]
    with torch.device("meta"):
        whole = sum(p.numel() for p in tiny_model("llama").parameters())
    for row in rows:
        assert 0 < row["ms_min"] <= row["ms_per_step"] and row["ms_mean"] > 0
        assert row["tokens_per_s"] == pytest.approx(2 * 16 * 1000 / row["ms_per_step"])
        assert row["setup_s"] > 0 and row["first_step_s"] > 0
        assert row["peak_memory_gb"] is None and row["weights_gb"] is None  # CUDA's counters only
        assert row["parameters"] == whole
        assert row["impl"] in finished.stdout
    hf, sharded = rows
    assert abs(hf["first_loss"] - sharded["first_loss"]) <= 1e-5
    assert abs(hf["last_loss"] - sharded["last_loss"]) <= 1e-5 and hf["last_loss"] != hf["first_loss"]


def test_training_speed_impls_fit_the_world_size(monkeypatch):
    parse_impl = benchmark_module(monkeypatch, "training_speed").parse_impl
    assert parse_impl("hf-compile", 1) == ("hf", True)
    assert parse_impl("fxtp-n1", 1) == ("fxtp", False)
    assert parse_impl("fxtp-n4-compile", 4) == ("fxtp", True)
    for name, world_size, message in [("fxtp-n2", 1, "needs 2 processes"), ("hf-eager", 2, "one process"),
                                      ("fxtp", 1, "unknown impl")]:
        with pytest.raises(SystemExit, match=message):
            parse_impl(name, world_size)
