"""Microseconds per all_reduce of [batch, hidden] by implementation (NCCL, symmetric memory's
one_shot_all_reduce, fxtp's push_all_reduce), a decode step's worth of calls back to back in one
CUDA graph, as inference_test.py's AR column measures them; picks push_all_reduce's MAX_BYTES.

    torchrun --nproc_per_node 2 benchmarks/all_reduce_latency.py --batch 1,4,16,64,128 --out ar.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from decode_floor import ModelStats, allreduce_ms  # benchmarks/, beside this script
from fxtp.kernels import push_all_reduce
from process_group import init_distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32, help="2 calls a layer, plus one")
    parser.add_argument("--batch", default="1,4,16,64,128")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--push-max-bytes", type=int, default=None,
                        help="push parts up to this size (default fxtp's MAX_BYTES; larger ones are NCCL's)")
    parser.add_argument("--out", default=None, help="JSON file (rank 0)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("it times CUDA all_reduces: run it with torchrun on a machine with GPUs")
    if args.push_max_bytes:
        push_all_reduce.MAX_BYTES = args.push_max_bytes
    rank, world, device = init_distributed("cuda")
    stats = ModelStats(weights=0, layers=args.layers, kv_heads=0, head_dim=0, hidden=args.hidden)
    calls, dtype = 2 * args.layers + 1, getattr(torch, args.dtype)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        per_step = allreduce_ms(batch, stats, dtype, device)
        rows.append({"batch": batch, "kb": batch * args.hidden * dtype.itemsize / 1024,
                     "us_per_call": {name: ms * 1e3 / calls for name, ms in per_step.items()}})
    if rank == 0:
        names = list(rows[0]["us_per_call"])
        print(f"{world} x {torch.cuda.get_device_name(device)}, {calls} calls a step, us per call")
        print("| batch | KB | " + " | ".join(names) + " |")
        for row in rows:
            cells = [f"{row['us_per_call'][name]:.1f}" for name in names]
            print(f"| {row['batch']} | {row['kb']:.0f} | " + " | ".join(cells) + " |")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"world_size": world, "device": torch.cuda.get_device_name(device),
                           "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
