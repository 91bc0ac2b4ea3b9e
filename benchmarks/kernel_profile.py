"""The kernels an impl runs, as inference_test.py reports them: --profile's kernels of one decode
step with the time at least one of them runs ("kernels" in the JSON, the lines under the table), and
the config of every Triton kernel inductor compiled and tuned ("tuned")."""
from __future__ import annotations

import json
import os
import tempfile

import torch

from peers import Runner  # benchmarks/peers.py, beside this script


def tuned_kernels(loaded: set) -> dict:
    """{kernel name: its config} of the Triton kernels in the modules inductor has loaded since `loaded`
    (ids of modules seen before, updated), as they run now: tuned on their first run. A module that a
    later variant shares with an earlier one is listed under the earlier one only."""
    from torch._inductor.codecache import PyCodeCache

    configs = {}
    for module in PyCodeCache.modules:
        if id(module) in loaded:
            continue
        loaded.add(id(module))
        for name, kernel in vars(module).items():
            launchers = getattr(kernel, "launchers", None)
            if name.startswith("triton_") and launchers:
                config = launchers[0].config
                configs[name] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return configs


def decode_kernels(runner: Runner, ids, mask, gen_len: int, top: int = 15) -> dict:
    """This rank's kernels of one decode step (--profile), from a generate profiled from its first
    token on: {"count": kernels per step, "busy_ms": time per step with one of them running, "top":
    [[name, count per step, ms per step], ...] the `top` longest in total}."""
    profiled = DecodeProfile()
    runner.generate(ids, mask, gen_len, profiled)
    steps = gen_len - 1 - runner.steps_ahead  # the steps queued when profiling starts ran before it
    ranked = sorted(profiled.totals.items(), key=lambda item: -item[1][1])
    return {"count": sum(count for count, _ in profiled.totals.values()) / steps,
            "busy_ms": profiled.busy_us / steps / 1e3,
            "top": [[name, round(count / steps, 3), round(us / steps / 1e3, 5)] for name, (count, us) in ranked[:top]]}


class DecodeProfile:
    """A streamer that profiles the decode steps only: from the first generated token (the second
    `put`; the first is the prompt), once the device has finished what was queued by then, to `end`.
    `totals` is then {kernel name: (launches, microseconds)}, `busy_us` the microseconds in which at
    least one kernel ran."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self.profiler = profile(activities=[ProfilerActivity.CUDA])
        self.puts = 0
        self.totals: dict[str, tuple[int, float]] = {}
        self.busy_us = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            torch.cuda.synchronize()
            self.profiler.start()

    def end(self) -> None:
        torch.cuda.synchronize()
        self.profiler.stop()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self.profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
        kernels = [event for event in events if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        for event in kernels:
            count, us = self.totals.get(event["name"], (0, 0.0))
            self.totals[event["name"]] = (count + 1, us + event["dur"])
        self.busy_us = union_length([(event["ts"], event["ts"] + event["dur"]) for event in kernels])


def union_length(intervals: list) -> float:
    """The length of the union of [start, end) intervals."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, reached))
        reached = max(reached, end)
    return total


def kernel_table(rows: list) -> str:
    """--profile's numbers, rank by rank: kernels per decode step, their busy time against p50, the
    longest ones."""
    lines = []
    for r in rows:
        p50 = r["decode_ms"]["p50"]
        for rank, k in enumerate(r.get("kernels", [])):
            lines.append(f"{r['impl']} N={r['world_size']} batch {r['batch']} rank {rank}: {k['count']:.1f} kernels "
                         f"a decode step, busy {k['busy_ms']:.3f} of {p50:.3f} ms "
                         f"(between kernels {p50 - k['busy_ms']:.3f} ms)")
            lines += [f"    {ms * 1e3:8.1f} us  {count:6.2f}x  {name[:110]}" for name, count, ms in k["top"]]
    return "\n".join(lines)
