"""benchmarks/inference_test.py on the CPU: fxtp on two gloo processes under torchrun, a tiny Llama;
its rows (token check against HF eager, parameters per rank, the ratio to the one-device rows),
--interleave's runs taking turns, the interval arithmetic behind --profile's busy time and its
kernel lines, and the tuned configs of inductor's kernels. The GPU numbers in
benchmarks/results/RESULTS.md come from the same script. (Its HF tp_plan and DeepSpeed peers need
accelerate and deepspeed, which the test install leaves out.)"""
import json
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmark_harness import benchmark_module, on_two_cpu_processes


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
