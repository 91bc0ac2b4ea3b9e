"""benchmarks/nccl_check.py on two gloo processes, and its bfloat16 verdict: rounding passes, a
missing all_reduce fails."""
import json

import pytest
import torch

from benchmark_harness import benchmark_module, on_two_cpu_processes


@pytest.mark.slow  # the equivalence it checks on GPUs is test_multiprocess.py's on CPU processes by default
def test_nccl_check_on_two_cpu_processes(tmp_path):
    """benchmarks/nccl_check.py on 2 gloo processes, a tiny Mixtral (the experts sharded) in bfloat16:
    the ranks agree, and the sharded logits are within bfloat16's rounding of the one-device ones."""
    out = tmp_path / "check.json"
    stdout = on_two_cpu_processes(tmp_path, "nccl_check.py", "--shape", "tiny:mixtral", "--layers", "2",
                                  "--dtype", "bfloat16", "--new-tokens", "4", "--out", str(out))
    report = json.loads(out.read_text())
    assert f"RESULT {json.dumps(report)}" in stdout
    assert report["world_size"] == 2 and report["ranks_identical"]
    assert report["within_dtype_tolerance"] and report["error_ratio"] <= 2
    assert report["max_abs_diff"] < 0.05 * report["logit_scale"]
    assert 0.5 * report["params_bytes_full"] <= report["params_bytes_rank0"] < 0.55 * report["params_bytes_full"]


def test_rounding_verdict_passes_rounding_and_fails_a_missing_all_reduce(monkeypatch):
    rounding_verdict = benchmark_module(monkeypatch, "nccl_check").rounding_verdict
    exact = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    one_device = exact.bfloat16()
    rounded_twice = (0.5 * exact).bfloat16() + (0.5 * exact).bfloat16()  # each rank's part, then their sum
    mask = torch.ones(2, 5, dtype=torch.long)
    verdict = rounding_verdict(rounded_twice, one_device, exact, mask)
    assert verdict["within_dtype_tolerance"] and verdict["top1_agreement"] == 1.0
    assert verdict["one_device_vs_float32"] == (one_device.float() - exact).abs().max().item() > 0
    missing = rounding_verdict((0.5 * exact).bfloat16(), one_device, exact, mask)  # one rank's part alone
    assert not missing["within_dtype_tolerance"] and missing["error_ratio"] > 100
    wrong_where_masked = rounded_twice.clone()
    wrong_where_masked[1, :3] = 0
    mask[1, :3] = 0
    assert rounding_verdict(wrong_where_masked, one_device, exact, mask)["within_dtype_tolerance"]
    assert not rounding_verdict(wrong_where_masked, one_device, exact, torch.ones_like(mask))["within_dtype_tolerance"]
