"""benchmarks/inference_test.py on the CPU: fxtp on two gloo processes under torchrun, a tiny Llama;
its rows (token check against HF eager, parameters per rank) and the interval arithmetic behind
--profile's busy time; benchmarks/attention_latency.py in Triton's interpreter; benchmarks/mlp_latency.py
and benchmarks/gemv_latency.py refusing a machine without a GPU, and the weight shapes gemv_latency.py
times; benchmarks/nccl_check.py on two gloo processes and its bfloat16 verdict; benchmarks/compile_memory.py
refusing too few --compiles to measure; benchmarks/training_memory.py on a tiny Llama (a rank's bytes at
TP=2 against one process) and benchmarks/training_speed.py on the CPU (HF eager against fxtp's rank
module at N=1); benchmarks/sweep_model_types.py on one tiny type at 2, 3 and 4 ranks, its WRONG rows,
its worker processes' timeouts and crashes, and the JSON its rows merge into, with the markdown and
README paragraph made from it. The GPU numbers in benchmarks/results/RESULTS.md come from the same scripts. (Its HF
tp_plan and DeepSpeed peers need accelerate and deepspeed, which the test install leaves out.)"""
import importlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.capture.export import capture
from fxtp.tiny_configs import tiny_model

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark_module(monkeypatch, name: str):
    """benchmarks/`name`.py as a module, with benchmarks/ on the path for this test: the scripts
    import their sibling modules (peers.py, kernel_timing.py, ...) from beside them."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module(name)


def test_busy_time_counts_overlapping_kernels_once(monkeypatch):
    union_length = benchmark_module(monkeypatch, "kernel_profile").union_length
    assert union_length([]) == 0
    assert union_length([(5, 6), (0, 2), (1, 3), (5.5, 5.75)]) == 4  # [0, 3) and [5, 6)
    assert union_length([(0, 10), (2, 3)]) == 10


def test_kernel_table_gives_every_rank_its_own_lines(monkeypatch):
    """--profile keeps every rank's kernels: at N=2 the rank that waits in its all_reduces for the
    other shows a longer push kernel and less time between kernels."""
    ranks = [{"count": 448.0, "busy_ms": busy, "top": [["push_all_reduce_kernel", 65.0, push]]}
             for busy, push in ((3.80, 0.44), (3.50, 0.20))]
    row = {"impl": "fxtp-compile", "world_size": 2, "batch": 1, "decode_ms": {"p50": 3.75}, "kernels": ranks}
    kernel_table = benchmark_module(monkeypatch, "kernel_profile").kernel_table
    lines = kernel_table([row, {**row, "impl": "hf", "kernels": []}]).splitlines()
    assert lines == [
        "fxtp-compile N=2 batch 1 rank 0: 448.0 kernels a decode step, busy 3.800 of 3.750 ms "
        "(between kernels -0.050 ms)",
        "       440.0 us   65.00x  push_all_reduce_kernel",
        "fxtp-compile N=2 batch 1 rank 1: 448.0 kernels a decode step, busy 3.500 of 3.750 ms "
        "(between kernels 0.250 ms)",
        "       200.0 us   65.00x  push_all_reduce_kernel"]


def test_interleave_times_the_variants_in_turns(monkeypatch):
    """--interleave: every --compile-options variant in one run, warmed up first, then timed trial by
    trial in turns; each keeps its own rows."""
    peers, impl_rows = benchmark_module(monkeypatch, "peers"), benchmark_module(monkeypatch, "impl_rows")
    ctx = peers.Context("checkpoint", None, torch.float32, torch.device("cpu"), 0, 1)
    variants = [{}, {"fxtp.decode_attention": False}]
    impls = ["fxtp", "fxtp-compile", "fxtp-compile-n1"]
    separate = impl_rows.impl_runs(impls, ctx, variants, interleave=False)
    together = impl_rows.impl_runs(impls, ctx, variants, interleave=True)
    assert [(name, [label for label, _ in runs]) for name, runs in separate] == [
        ("fxtp", ["fxtp"]), ("fxtp-compile", ["fxtp-compile"]),
        ("fxtp-compile", ['fxtp-compile {"fxtp.decode_attention":false}']),
        ("fxtp-compile-n1", ["fxtp-compile-n1"]),
        ("fxtp-compile-n1", ['fxtp-compile-n1 {"fxtp.decode_attention":false}'])]
    assert [(name, [label for label, _ in runs]) for name, runs in together] == [
        ("fxtp", ["fxtp"]), ("fxtp-compile", ["fxtp-compile", 'fxtp-compile {"fxtp.decode_attention":false}']),
        ("fxtp-compile-n1", ["fxtp-compile-n1", 'fxtp-compile-n1 {"fxtp.decode_attention":false}'])]
    assert [run_ctx.compile_options for _, run_ctx in together[1][1]] == variants
    assert [run_ctx.compile_options for _, run_ctx in together[2][1]] == variants
    decode_impls = benchmark_module(monkeypatch, "decode_impls")
    monkeypatch.setattr(decode_impls, "fxtp_runner", lambda run_ctx, compile: (run_ctx.world_size, compile))
    for name, runs in together[1:]:
        setup = decode_impls.IMPLS[name][0]
        assert [setup(run_ctx)[1] for _, run_ctx in runs] == [True, {"fxtp.decode_attention": False}]
    repeated = impl_rows.impl_runs(["fxtp-compile"], ctx, [{}, {}], interleave=True)
    assert [label for label, _ in repeated[0][1]] == ["fxtp-compile", "fxtp-compile (2)"]  # rows keep their tokens

    calls = []

    def runner(name, new_token):
        def generate(ids, mask, new_tokens, streamer):
            calls.append(name)
            for _ in range(new_tokens + 1):  # the prompt's put, then one a token
                streamer.put(ids)
            return torch.cat([ids, torch.full((1, new_tokens), new_token(len(calls)))], dim=1)
        return peers.Runner(generate, lambda: {"parameters": 0, "cache": None})

    args = type("Args", (), {"warmup": 1, "trials": 3, "gen_len": 4})()
    ids = torch.zeros(1, 2, dtype=torch.long)
    runners = [runner("a", lambda call: 1), runner("b", lambda call: 2), runner("c", lambda call: call)]
    measured = benchmark_module(monkeypatch, "decode_timing").measure(runners, ids, None, args, torch.device("cpu"))
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3
    assert [tokens[0, 2:].tolist() for tokens, _ in measured] == [[1] * 4, [2] * 4, [12] * 4]  # the last trial's
    assert [numbers["decode_steps"] for _, numbers in measured] == [9, 9, 9]  # 3 trials of 3 intervals
    assert [numbers["trials_identical"] for _, numbers in measured] == [True, True, False]
    assert [numbers["tuned"] for _, numbers in measured] == [{}, {}, {}]  # eager: inductor compiled nothing


def test_tuned_kernels_gives_the_configs_of_the_kernels_loaded_since(monkeypatch):
    """The Triton kernels inductor loaded for an impl, with the config each runs (after tuning); a
    module read before is not read again, and other attributes are not kernels."""
    from torch._inductor.codecache import PyCodeCache

    def module(**kernels):
        return types.SimpleNamespace(**kernels, async_compile=object(), call=lambda args: None)

    def kernel(warps, **blocks):
        config = types.SimpleNamespace(kwargs=blocks, num_warps=warps, num_stages=1)
        return types.SimpleNamespace(launchers=[types.SimpleNamespace(config=config)])

    first = module(triton_red_fused_mm_1=kernel(16, XBLOCK=2, R0_BLOCK=2048), triton_poi_fused_2=kernel(4, XBLOCK=256))
    second = module(triton_red_fused_mm_1=kernel(8, XBLOCK=1, R0_BLOCK=4096), triton_unloaded=kernel(4))
    second.triton_unloaded.launchers = []  # not run yet: nothing tuned
    tuned_kernels = benchmark_module(monkeypatch, "kernel_profile").tuned_kernels
    monkeypatch.setattr(PyCodeCache, "modules", [first])
    loaded = set()
    assert tuned_kernels(loaded) == {
        "triton_red_fused_mm_1": {"XBLOCK": 2, "R0_BLOCK": 2048, "num_warps": 16, "num_stages": 1},
        "triton_poi_fused_2": {"XBLOCK": 256, "num_warps": 4, "num_stages": 1}}
    PyCodeCache.modules.append(second)
    assert tuned_kernels(loaded) == {
        "triton_red_fused_mm_1": {"XBLOCK": 1, "R0_BLOCK": 4096, "num_warps": 8, "num_stages": 1}}
    assert tuned_kernels(loaded) == {}


def on_two_cpu_processes(tmp_path, script: str, *arguments: str) -> str:
    """benchmarks/`script` under torchrun on 2 gloo processes (`--device cpu`): its stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(BENCHMARKS, script), "--device", "cpu", *arguments]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stdout


def fxtp_on_two_cpu_processes(tmp_path, *options: str) -> tuple[dict, str]:
    """inference_test.py under torchrun on 2 gloo processes, fxtp at N=2 and fxtp-n1 on rank 0, a tiny
    Llama in float32: (its JSON, its stdout)."""
    out = tmp_path / "result.json"
    stdout = on_two_cpu_processes(tmp_path, "inference_test.py", "--shape", "tiny:llama", "--dtype", "float32",
                                  "--prompt-len", "8", "--gen-len", "8", "--warmup", "1", "--trials", "1",
                                  "--impl", "fxtp,fxtp-n1", "--single-too",
                                  "--checkpoint-dir", str(tmp_path / "checkpoint"), "--out", str(out), *options)
    return json.loads(out.read_text()), stdout


@pytest.mark.slow  # test_inference_test_on_two_cpu_processes runs the same script by default
def test_without_the_hf_reference_the_first_row_is_the_reference(tmp_path):
    """--no-reference at N > 1: the rows are checked against the first impl's tokens, as at N = 1
    (an A/B of --compile-options variants, or N = 2 against --single-too's one-device rows)."""
    result, stdout = fxtp_on_two_cpu_processes(tmp_path, "--batch", "1", "--no-reference")
    assert result["meta"]["reference"] == "fxtp"
    assert [(row["impl"], row["match"], row["checked"]) for row in result["results"]] == [("fxtp", 8, 8),
                                                                                          ("fxtp-n1", 8, 8)]
    assert "reference: fxtp;" in stdout


def test_inference_test_on_two_cpu_processes(tmp_path, monkeypatch):
    """fxtp on both ranks, and fxtp compiled for one device on rank 0 (--single-too), in one run: the
    2-rank rows are also given over the 1-device rows."""
    result, stdout = fxtp_on_two_cpu_processes(tmp_path, "--batch", "1,2")
    rows = result["results"]
    assert [(row["impl"], row["world_size"], row["batch"]) for row in rows] == [
        ("fxtp", 2, 1), ("fxtp", 2, 2), ("fxtp-n1", 1, 1), ("fxtp-n1", 1, 2)]
    for row in rows:
        assert row["ranks_identical"]
        assert row["match"] == row["checked"] == 8  # float32: token-exact against HF eager on one process
        assert row["decode_steps"] == 7 and 0 < row["decode_ms"]["p50"] <= row["decode_ms"]["p99"]
    model_config = benchmark_module(monkeypatch, "random_model").model_config
    with torch.device("meta"):
        whole = AutoModelForCausalLM.from_config(model_config("tiny:llama", None))
    whole_bytes = sum(p.numel() for p in whole.parameters()) * 4
    sharded, single = rows[:2], rows[2:]
    for row in sharded:  # each rank holds about half (norms and the like are replicated)
        assert row["param_bytes"][0] == row["param_bytes"][1]
        assert 0.5 * whole_bytes <= row["param_bytes"][0] < 0.6 * whole_bytes
    for row, alone in zip(sharded, single):
        assert whole_bytes <= alone["param_bytes"][0] < 1.001 * whole_bytes  # all of it (and RoPE's frequencies)
        assert "x_best_1gpu" not in alone
        assert row["best_1gpu"] == "fxtp-n1"
        assert row["x_best_1gpu"] == row["decode_ms"]["p50"] / alone["decode_ms"]["p50"]
    assert f"fxtp N=2 batch 1: {rows[0]['x_best_1gpu']:.3f}x of the fastest 1-GPU row (fxtp-n1, same run)" \
        in stdout


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
    monkeypatch.syspath_prepend(BENCHMARKS)
    rounding_verdict = importlib.import_module("nccl_check").rounding_verdict
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


def refusal(script: str, monkeypatch, capsys, *arguments: str) -> str:
    """benchmarks/`script`.py's main() as the command line `script.py arguments` runs it (benchmarks/ on the
    path), in this process: it must stop at its arguments (argparse's exit status 2). What it printed to stderr."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *arguments])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main()
    assert stopped.value.code == 2
    return capsys.readouterr().err


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
    monkeypatch.syspath_prepend(BENCHMARKS)
    parse_impl = importlib.import_module("training_speed").parse_impl
    assert parse_impl("hf-compile", 1) == ("hf", True)
    assert parse_impl("fxtp-n1", 1) == ("fxtp", False)
    assert parse_impl("fxtp-n4-compile", 4) == ("fxtp", True)
    for name, world_size, message in [("fxtp-n2", 1, "needs 2 processes"), ("hf-eager", 2, "one process"),
                                      ("fxtp", 1, "unknown impl")]:
        with pytest.raises(SystemExit, match=message):
            parse_impl(name, world_size)


def test_compile_memory_refuses_too_few_compiles_to_measure(monkeypatch, capsys):
    """benchmarks/compile_memory.py reads RSS every 10 rounds from round 0: under 10 compiles it has one
    reading and no growth to divide, so it stops at its arguments; at 10 it goes on to build the model."""
    for compiles in ("0", "9"):
        assert "--compiles must be at least 10" in refusal("compile_memory", monkeypatch, capsys, "--compiles", compiles)

    class Started(Exception):
        pass

    def started(arch):
        raise Started(arch)

    compile_memory = importlib.import_module("compile_memory")
    monkeypatch.setattr(compile_memory, "tiny_model", started)
    monkeypatch.setattr(sys, "argv", ["compile_memory.py", "--compiles", "10"])
    with pytest.raises(Started):
        compile_memory.main()


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)  # it imports benchmarks/sweep_report.py from beside it
    return importlib.import_module("sweep_model_types")


def exact_size(params_per_rank: float) -> dict:
    return {"result": "exact", "max_abs_diff": 2e-7, "params_per_rank": params_per_rank,
            "params_mean": params_per_rank, "biggest_replicated": "", "all_reduce_per_layer": "2"}


def sweep_row(model_type: str, **sizes: dict) -> dict:
    return {"model_type": model_type, "heads": 4, "skipped": "", "sizes": {ws[1:]: s for ws, s in sizes.items()}}


def test_sweep_row_at_two_three_and_four_ranks(sweep):
    """A Llama-like type of the sweep (arcee: 4 heads, every projection sharded) is exact at N = 2, 3
    and 4, its parameters per rank halve at 2 and quarter at 4 (norms stay whole); at 3 the fullest
    rank holds 2 of the 4 heads, above 1/3 + 0.05, and the row's reason says so."""
    row = sweep.measure("arcee")
    sizes = row["sizes"]
    assert row["heads"] == 4
    assert {ws: s["result"] for ws, s in sizes.items()} == {"2": "exact", "3": "exact", "4": "exact"}
    assert all(s["max_abs_diff"] <= 1e-5 for s in sizes.values())
    assert 0.5 < sizes["2"]["params_per_rank"] < 0.51 and 0.25 < sizes["4"]["params_per_rank"] < 0.26
    assert sizes["3"]["params_per_rank"] > sweep.sweep_report.bound(3) >= sizes["3"]["params_mean"]
    assert sizes["2"]["biggest_replicated"].endswith("in no projection group")  # a norm weight
    goal, cause, why = sweep.sweep_report.verdict(row)
    assert (goal, cause) == ("no (N=3)", "uneven split at N=3") and "(4 heads over 3 ranks)" in why


def test_sweep_counts_the_pieces_capture_cut_out_of_parameters(sweep):
    """Mamba-2's in_proj is cut into pieces, some cut again (names like w[128:1280][0:128]): every
    parameter byte is on some rank, so the ranks' shares add up to at least the whole."""
    from fxtp.tiny_configs import generic_tiny_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_tiny_config("mamba2")).eval()
    shares = sweep.parameter_shares(fxtp.compile(model, 2), model)
    assert 2 * shares["params_mean"] >= 1 and 0.5 <= shares["params_per_rank"] < 0.55


def test_sweep_reports_a_wrong_result_loudly(sweep, monkeypatch, tmp_path):
    """Logits that differ from the unsharded model's are a WRONG row: in the markdown, its summary,
    and the run's exit status."""
    import fxtp.testing

    def differs(model, world_size, *batch, **kwargs):
        raise AssertionError(f"world_size={world_size}: max abs diff 3.000e-01 > 1.0e-04")

    monkeypatch.setattr(fxtp.testing, "assert_equivalent", differs)
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 5))
    size = sweep.measure_size(model, capture(model), 2, ids, torch.ones_like(ids))
    assert size["result"] == "wrong" and "3.000e-01" in size["detail"] and size["params_per_rank"] < 0.51

    row = sweep_row("llama", N2=size, N3=exact_size(0.36), N4=exact_size(0.26))
    monkeypatch.setattr(sweep, "sweep", lambda model_types, jobs, timeout, experts: iter([row]))
    results = str(tmp_path / "sweep.json")
    monkeypatch.setattr(sys, "argv", ["sweep_model_types.py", "--types", "llama", "--results", results])
    with pytest.raises(SystemExit, match="WRONG results .*: llama N=2"):
        sweep.main()
    data = sweep.sweep_report.load(results)
    text = sweep.sweep_report.markdown(data)
    assert "| llama | 4 | **WRONG** | exact | exact |" in text and "**WRONG: llama (N=2)**" in text
    assert sweep.sweep_report.verdict(row) == ("no (N=2)", "wrong", f"N=2 wrong: {size['detail']}")


def test_sweep_rows_merge_by_type_and_versions_stay_apart(sweep, tmp_path):
    """Runs over parts of the list (--types) replace only their types' rows; each transformers
    version keeps its own section."""
    report = sweep.sweep_report
    path = str(tmp_path / "sweep.json")
    new, old = report.Section("5.25.0", "2.13.0"), report.Section("5.17.0", "2.11.0")
    built = sweep_row("b", N2=exact_size(0.50), N3=exact_size(0.36), N4=exact_size(0.26))
    unbuilt = {**sweep_row("b"), "build_failure": "model: KeyError: 'x'"}
    report.merge(path, new, [sweep_row("a", N2=exact_size(0.50)), unbuilt])
    assert report.verdict(sweep_row("a", N2=exact_size(0.50))) == ("no (N=3, 4)", "error", "N=3 error: not measured")
    refused = sweep_row("a", N2={"result": "refused", "detail": "CaptureError: no"},
                        N3=exact_size(0.36), N4=exact_size(0.26))
    report.merge(path, old, [refused])
    report.merge(path, new, [built])
    data = report.load(path)
    assert list(data) == ["transformers 5.17", "transformers 5.25"]
    assert data["transformers 5.25"]["types"] == {"a": sweep_row("a", N2=exact_size(0.50)), "b": built}
    assert data["transformers 5.17"]["torch"] == "2.11.0"
    assert data["transformers 5.17"]["types"]["a"]["sizes"]["2"]["result"] == "refused"
    assert report.verdict(built) == ("yes", "", "")
    assert report.verdict(refused) == ("no (N=2)", "refused", "N=2 refused: CaptureError: no")


def test_sweep_writes_the_markdown_and_readme_paragraph_from_the_json(sweep, tmp_path):
    """--write-markdown: one section per version in the markdown, naming the candidates not run yet;
    README's sweep paragraph names both versions and the rest of README stays as it was."""
    report = sweep.sweep_report
    path, readme = str(tmp_path / "sweep.json"), tmp_path / "README.md"
    readme.write_text(f"# fxtp\n\n{report.README_HEADING}\n\nold numbers\n\n## Performance\n\nfast\n")
    over = {**exact_size(0.70), "params_mean": 0.70, "biggest_replicated": "model.layers.0.mixer.in_proj.weight "
            "(0.40 of parameters): attention with q replicated"}
    row = sweep_row("a", N2=over, N3=exact_size(0.36), N4=exact_size(0.26))
    report.merge(path, report.Section("5.25.0", "2.13.0"), [row], candidates=["a", "z"])
    report.merge(path, report.Section("5.17.0", "2.11.0"), [{**sweep_row("a"), "skipped": "encoder-decoder"}])
    report.write_markdown(path, str(readme))
    text = (tmp_path / "sweep.md").read_text()
    assert "transformers 5.25.0 (torch 2.13.0): 1 types not run yet (z); 1 types, 0 skipped; of the 1 tried" in text
    assert "## transformers 5.25" in text and "## transformers 5.17" in text and "Skipped: encoder-decoder: a." in text
    assert ("| a | 4 | exact | exact | exact | 2.0e-07 | 0.70, 0.36, 0.26 | 2 | no (N=2) | "
            "N=2 params/rank 0.70, replicated "
            "model.layers.0.mixer.in_proj.weight (0.40 of parameters): attention with q replicated |") in text
    lines = readme.read_text().split("\n")
    assert lines[:4] == ["# fxtp", "", report.README_HEADING, ""]
    assert lines[-5:] == ["", "## Performance", "", "fast", ""]
    paragraph = " ".join(lines[4:-5])
    assert ("transformers 5.25.0 (torch 2.13.0): 1 types tried, 1 not run yet, 1 build, 1 exact at N=2, 3 and 4, "
            "none wrong; goal met by 0 of 1 (not: parameters replicated at N=2 1, ...).") in paragraph
    assert "transformers 5.17.0 (torch 2.11.0): 0 types tried, 0 build" in paragraph and "old numbers" not in paragraph


def test_sweep_keeps_the_world_sizes_a_timed_out_or_crashed_type_finished(sweep):
    """A type that hangs or crashes its worker after N=2 keeps its N=2 row; N=3 and 4 say why they
    are missing, and the next type gets a fresh worker."""
    partial = json.dumps(sweep_row("slow", N2=exact_size(0.5)))
    child = ("import sys, time\n"
             "for line in sys.stdin:\n"
             f"    print({sweep.sweep_worker.ROW!r} + {partial!r}, flush=True)\n"
             "    if line.strip() == 'crash': sys.exit('boom')\n"
             "    time.sleep(60)\n")
    worker = sweep.sweep_worker.Worker([sys.executable, "-c", child])
    missing = {"result": "error", "detail": "process: timed out after 1 s"}
    assert worker.measure("slow", 1, sweep.WORLD_SIZES)["sizes"] == {"2": exact_size(0.5), "3": missing, "4": missing}
    crashed = {"result": "error", "detail": "process: exited with 1: boom"}
    assert worker.measure("crash", 30, sweep.WORLD_SIZES)["sizes"] == {"2": exact_size(0.5), "3": crashed, "4": crashed}
    worker.close()
