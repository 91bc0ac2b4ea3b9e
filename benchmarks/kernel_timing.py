"""Wall-clock timing of a step on the device, as the kernel microbenchmarks (attention_latency.py,
gemv_latency.py, mlp_latency.py) and inference_test.py's AR column take it: a step captured once
as a CUDA graph and replayed, the replays of several variants taking turns."""
from __future__ import annotations

import argparse
import time

import torch

from fxtp.decode.options import DecodeOptions, resolve


def synchronizer(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def as_cuda_graph(step):
    step()  # NCCL communicators and symmetric-memory handles exist before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        step()
    return graph.replay


def time_ms(step, reps: int, sync) -> float:
    step()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    return (time.perf_counter() - start) / reps * 1e3


def add_turn_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a kernel microbenchmark that replays CUDA graphs in turns (`fastest_in_turns`)."""
    parser.add_argument("--reps", type=int, default=40, help="replays a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None, help="JSON file")


def step_inductor_options(store_gemv_inputs: bool = False) -> dict:
    """The inductor options of a 1-GPU decode step (coordinate descent, PDL; the post-grad pass of
    passes/decode/store_gemv_inputs.py if `store_gemv_inputs`), without fxtp's rewrites of the step's
    graph: a kernel microbenchmark compiles with them as the step does."""
    return resolve(DecodeOptions(store_gemv_inputs=store_gemv_inputs), 1, symmetric_memory=False).inductor_options()


def fastest_in_turns(replays: dict, reps: int, rounds: int, calls: int) -> dict:
    """{name: us a call}: each replay (a CUDA graph of `calls` calls) timed `reps` times a round, the
    replays taking turns for `rounds` rounds (drift falls on all alike); the fastest round of each."""
    fastest = {}
    for _ in range(rounds):
        for name, replay in replays.items():
            us = time_ms(replay, reps, torch.cuda.synchronize) * 1e3 / calls
            fastest[name] = min(us, fastest.get(name, us))
    return fastest
