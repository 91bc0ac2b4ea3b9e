"""Time and peak memory of `fxtp dump` on a big model's config, which it builds on the meta device.

    python benchmarks/dump_config.py [--shape llama3-70b] [--world-size 8]

Writes the config of a real model shape (fxtp.tiny_configs.REAL_SHAPES; as a released checkpoint's
config.json names them: the model class in `architectures`, dtype bfloat16) to a temporary
directory, runs `fxtp dump DIR --world-size N` in a subprocess and prints one JSON line: its wall
time, its CPU time (user + system: on a shared machine the wall time also waits for other
processes), its peak RSS (ru_maxrss of the children) and the size of the dump. The goal: under
60 s and 2 GB for a 70B config.

This process imports neither torch nor transformers, and writes the config in a child of its own:
a child's ru_maxrss counts the memory of the process it was forked from (Linux keeps the high-water
mark across exec), so a parent holding torch would show in the figure. The config writer imports a
subset of what the dump imports, so the maximum over both children is the dump's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

GOAL_SECONDS, GOAL_MB = 60, 2048

_WRITE_CONFIG = """
import sys, torch
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from fxtp.tiny_configs import real_config
config = real_config(sys.argv[1])
config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]  # every real shape is a causal LM
config.dtype = torch.bfloat16
config.save_pretrained(sys.argv[2])
"""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-70b", help="a key of fxtp.tiny_configs.REAL_SHAPES (default llama3-70b)")
    parser.add_argument("--world-size", type=int, default=8, help="ranks to plan for (default 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as path:
        subprocess.run([sys.executable, "-c", _WRITE_CONFIG, args.shape, path], check=True)
        cpu_before = children_cpu_seconds()
        start = time.perf_counter()
        dump = subprocess.run([sys.executable, "-m", "fxtp.cli", "dump", path, "--world-size", str(args.world_size)],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if dump.returncode != 0:
        print(dump.stderr, file=sys.stderr)
        print(f"fxtp dump exited with {dump.returncode}", file=sys.stderr)
        return 1
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    report = {"shape": args.shape, "world_size": args.world_size, "wall_s": round(wall, 1),
              "cpu_s": round(children_cpu_seconds() - cpu_before, 1), "peak_rss_mb": round(peak_mb),
              "dump_lines": dump.stdout.count("\n"), "cpus": os.cpu_count(),
              "load_average_1min": round(os.getloadavg()[0], 1),
              "goal": f"under {GOAL_SECONDS} s and {GOAL_MB} MB",
              "met_goal": wall < GOAL_SECONDS and peak_mb < GOAL_MB}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
