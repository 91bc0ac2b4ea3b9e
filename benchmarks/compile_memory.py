"""Resident memory over repeated fxtp.compile calls of one model, each program dropped after use.

    python benchmarks/compile_memory.py [--compiles 40] [--out results.json]

Each round compiles a tiny Llama over 2 ranks, runs tp.simulate once and drops the program; RSS
(/proc/self/statm) and the number of torch.fx generated sources kept for tracebacks are read every
10 rounds. What a dropped program leaves behind is the growth per round.
"""
from __future__ import annotations

import argparse
import gc
import json

import torch

import fxtp
from fxtp.runtime.generation import generated_sources
from fxtp.tiny_configs import tiny_model
from generate_memory import rss_mb  # run as a script: benchmarks/ is on the path

EVERY = 10  # rounds between readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiles", type=int, default=40)
    parser.add_argument("--out")
    args = parser.parse_args()
    # readings are taken every EVERY rounds from round 0, so the growth needs a second one: round EVERY
    if args.compiles < EVERY:
        parser.error(f"--compiles must be at least {EVERY}")
    model = tiny_model("llama")
    readings = []
    for round_ in range(args.compiles + 1):
        tp = fxtp.compile(model, 2)
        tp.simulate(torch.tensor([[5, 6, 7]]))
        del tp
        gc.collect()
        if round_ % EVERY == 0:
            readings.append(dict(compiles=round_ + 1, rss_mb=round(rss_mb(), 1), fx_sources=len(generated_sources())))
            print(readings[-1], flush=True)
    per_compile = (readings[-1]["rss_mb"] - readings[0]["rss_mb"]) / (readings[-1]["compiles"] - readings[0]["compiles"])
    print(f"RSS per compile after the first: {per_compile:.2f} MB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(readings=readings, rss_mb_per_compile=per_compile, torch=torch.__version__), f, indent=2)


if __name__ == "__main__":
    main()
