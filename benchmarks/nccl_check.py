"""Equivalence on GPUs with NCCL: each rank runs its fxtp module, rank 0 compares with the
unsharded model on one GPU (logits and greedy tokens, recomputing the full prefix each step).

    torchrun --nproc_per_node 2 benchmarks/nccl_check.py --shape llama3-8b --layers 4 --dtype bfloat16

Every process builds the same seeded random-weight model on its GPU. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.configs import real_config, tiny_config


def greedy(step, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of `ids` by `new_tokens` tokens; `step(ids)` returns logits."""
    for _ in range(new_tokens):
        nxt = step(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", help="a real shape of fxtp.configs, or tiny:ARCH")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype)
    config = tiny_config(args.shape[5:], layers=args.layers) if args.shape.startswith("tiny:") \
        else real_config(args.shape, args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

    tp = fxtp.compile(model, world)
    gm = tp.module(rank, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (2, 16), device=device, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        sharded = gm(ids, mask)
        tokens = greedy(lambda x: gm(x), ids[:1], args.new_tokens)
        if rank == 0:
            full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            ref_tokens = greedy(lambda x: model(input_ids=x, use_cache=False).logits, ids[:1], args.new_tokens)
    gathered = [torch.empty_like(sharded) for _ in range(world)]
    dist.all_gather(gathered, sharded)
    if rank == 0:
        scale = full.float().abs().max().item()
        report = {
            "shape": args.shape, "layers": args.layers, "dtype": args.dtype, "world_size": world,
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "ranks_identical": all(torch.equal(g_, gathered[0]) for g_ in gathered),
            "max_abs_diff": (sharded.float() - full.float()).abs().max().item(), "logit_scale": scale,
            "greedy_tokens_equal": torch.equal(tokens, ref_tokens),
            "first_token_mismatch": next((i for i in range(tokens.shape[1]) if tokens[0, i] != ref_tokens[0, i]), None),
            "params_bytes_rank0": sum(p.numel() * p.element_size() for p in gm.parameters()),
            "params_bytes_full": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
        print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
