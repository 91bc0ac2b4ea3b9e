"""Resident memory over many generate calls that cycle over batch sizes and cache lengths.

    python benchmarks/generate_memory.py [--calls 1000] [--world-size 2] [--out results.json]

A tiny Llama (2 layers) sharded over `--world-size` ranks simulated in this process; call i generates 2
tokens at batch BATCHES[i % 5] with cache length LENGTHS[(i // 5) % 5], so every call changes shape. RSS
is read from /proc/self/statm after each round of 25 calls; the figure that matters is the growth
after the first round (when every shape's program exists), which must stay within a small bound.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

import fxtp
from fxtp.tiny_configs import tiny_model

BATCHES = (1, 2, 3, 5, 8)
LENGTHS = (32, 64, 96, 128, 160)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    tp = fxtp.compile(tiny_model("llama", layers=2), args.world_size)
    rounds, start = [], time.monotonic()
    for i in range(args.calls):
        batch, length = BATCHES[i % 5], LENGTHS[(i // 5) % 5]
        ids = torch.randint(1, 256, (batch, 8), generator=torch.Generator().manual_seed(i))
        tp.generate(ids, max_new_tokens=2, max_length=length)
        if (i + 1) % 25 == 0:
            gc.collect()
            rounds.append(round(rss_mb(), 1))
            print(f"{i + 1:5d} calls  RSS {rounds[-1]:8.1f} MB  ({time.monotonic() - start:.0f} s)", flush=True)
    result = {"calls": args.calls, "world_size": args.world_size, "rss_mb_per_25_calls": rounds,
              "growth_after_first_round_mb": round(rounds[-1] - rounds[0], 1), "torch": torch.__version__}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
