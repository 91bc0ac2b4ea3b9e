"""Timing greedy generations: a streamer that stamps each token as it reaches the host, and the
warmups and trials of one batch size over one or more runners taking turns (inference_test.py's
docstring says what the numbers mean)."""
from __future__ import annotations

import time

import torch

from kernel_profile import tuned_kernels  # benchmarks/, beside this script
from kernel_timing import synchronizer
from peers import Runner

PERCENTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "p999": 0.999}


class StepTimer:
    """An HF-style streamer that stamps the time of every `put`: when the tokens reach the host.
    It does not sync the device, which would also wait for a step the generator has already queued."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.device.type != "cpu":
            raise RuntimeError(f"the streamer got tokens on {value.device}; a stamp means they reached the host")
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    @property
    def prefill(self) -> float:
        return self.times[1] - self.times[0]

    @property
    def decode(self) -> list[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def measure(runners: list[Runner], ids, mask, args, device: torch.device) -> list[tuple[torch.Tensor, dict]]:
    """Warm up each runner, then time `trials` greedy generations of `gen_len` tokens each, the runners
    taking turns trial by trial (--interleave), so that the machine's drift falls on all of them.
    first_generate_s is the first warmup's wall time: it includes whatever an impl compiles and
    captures for this batch size. Peak memory is given for a runner timed alone only. trials_identical:
    whether every trial generated the same tokens (the tokens returned are the last trial's)."""
    first_generate, tuned, loaded = [], [], set()
    for runner in runners:
        for i in range(args.warmup):
            start = time.perf_counter()
            runner.generate(ids, mask, args.gen_len, StepTimer())
            if i == 0:
                first_generate.append(time.perf_counter() - start)
        tuned.append(tuned_kernels(loaded))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = [{"prefill": [], "decode": [], "wall": []} for _ in runners]
    tokens, repeatable = [None] * len(runners), [True] * len(runners)
    for _ in range(args.trials):
        for i, runner in enumerate(runners):
            timer = StepTimer()
            start = time.perf_counter()
            generated = runner.generate(ids, mask, args.gen_len, timer)
            synchronizer(device)()
            repeatable[i] &= tokens[i] is None or torch.equal(generated, tokens[i])
            tokens[i] = generated
            timed[i]["wall"].append(time.perf_counter() - start)
            timed[i]["prefill"].append(timer.prefill)
            timed[i]["decode"].extend(timer.decode)
    alone = device.type == "cuda" and len(runners) == 1
    results = []
    for i, times in enumerate(timed):
        decode_s = torch.tensor(times["decode"], dtype=torch.float64)
        results.append((tokens[i].cpu(), {
            "prefill_ms": sorted(times["prefill"])[len(times["prefill"]) // 2] * 1e3,
            "decode_ms": {key: decode_s.quantile(q).item() * 1e3 for key, q in PERCENTILES.items()},
            "decode_steps": len(times["decode"]),
            "tokens_per_s": ids.shape[0] * args.gen_len / (sum(times["wall"]) / len(times["wall"])),
            "peak_bytes": torch.cuda.max_memory_allocated(device) if alone else None,
            "first_generate_s": first_generate[i] if first_generate else None,
            "trials_identical": repeatable[i],
            "tuned": tuned[i],
        }))
    return results
