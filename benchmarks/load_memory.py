"""Peak memory of loading a checkpoint: fxtp per rank (compile on meta, read this rank's slices)
against transformers' from_pretrained of the whole model, each in a fresh process.

    python benchmarks/load_memory.py [--hidden 2048 --layers 12 --world-size 2]

Saves a random bf16 Llama-style model (about 1.5 GB at the defaults) to a temporary directory,
then reports peak RSS (VmHWM) of: a process that only imports torch and transformers, one
that runs from_pretrained, and every fxtp rank (real gloo processes). Both touch every loaded
parameter first, since safetensors may map weights from the file lazily. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fxtp
from fxtp.runtime.rank_processes import run_ranks

def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: that one is inherited across fork and exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
if sys.argv[1] == "load":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
    sum(float(p.sum()) for p in model.parameters())  # weights may be mmap-backed: touch them all
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_mb_of(*args: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


def fxtp_rank(rank: int, path: str, world_size: int) -> float:
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gm = fxtp.compile(model, world_size).module(rank, checkpoint=path)
    sum(float(p.sum()) for p in gm.parameters())  # touched like the from_pretrained ones
    return peak_rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    config = AutoConfig.for_model("llama", hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                                  num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                                  vocab_size=32000)
    with tempfile.TemporaryDirectory() as path:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
        model.save_pretrained(path)
        del model
        imports = peak_mb_of("imports")
        full = peak_mb_of("load", path)
        ranks = run_ranks(fxtp_rank, args.world_size, path, args.world_size, timeout=600)
    report = {"checkpoint_gb": round(size_gb, 2), "world_size": args.world_size,
              "peak_rss_mb_imports_only": round(imports), "peak_rss_mb_from_pretrained": round(full),
              "peak_rss_mb_fxtp_ranks": [round(r) for r in ranks],
              "ratio_fxtp_max_rank_to_from_pretrained": round(max(ranks) / full, 3),
              "ratio_above_imports": round((max(ranks) - imports) / (full - imports), 3)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
