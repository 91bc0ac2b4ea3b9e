"""Equivalence on GPUs with NCCL: each rank runs its fxtp module, rank 0 compares with the
unsharded model on one GPU (logits and greedy tokens, recomputing the full prefix each step).
Below float32, rank 0 also runs the unsharded model in float32 on the same weights, to set the
sharding's difference beside the dtype's own rounding (see `rounding_verdict`).

    torchrun --nproc_per_node 2 benchmarks/nccl_check.py --shape llama3-8b --layers 4 --dtype bfloat16
    torchrun --nproc_per_node 2 benchmarks/nccl_check.py --shape mixtral-8x7b --layers 2 --dtype bfloat16

Every process builds the same seeded random-weight model on its device. Prints one JSON line, and
writes it to --out if given. `--device cpu` runs the same on gloo processes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import fxtp
from fxtp.tiny_configs import real_config, tiny_config


def greedy(step, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of `ids` by `new_tokens` tokens; `step(ids)` returns logits."""
    for _ in range(new_tokens):
        nxt = step(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def rounding_verdict(sharded: torch.Tensor, one_device: torch.Tensor, exact: torch.Tensor,
                     mask: torch.Tensor) -> dict:
    """The sharded logits against the unsharded model's in the same dtype (`one_device`) and in
    float32 on the same weights (`exact`), over the positions `mask` keeps. Sharding rounds each
    row-parallel output once more than one device does (each rank's partial sum, then their sum), so
    the sharded logits count as within the dtype's tolerance when they are at most twice as far from
    float32 as the one-device logits are; a wrong shard or a missing all_reduce is off by the logits'
    own scale."""
    keep = mask.bool()
    sharded, one_device, exact = (t.float()[keep] for t in (sharded, one_device, exact))
    sharded_error = (sharded - exact).abs().max().item()
    dtype_error = (one_device - exact).abs().max().item()
    return {"sharded_vs_float32": sharded_error, "one_device_vs_float32": dtype_error,
            "error_ratio": sharded_error / dtype_error if dtype_error else None,
            "within_dtype_tolerance": sharded_error <= 2 * dtype_error,
            "top1_agreement": (sharded.argmax(-1) == one_device.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama3-8b", help="a real shape of fxtp.tiny_configs, or tiny:ARCH")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", default=None, help="JSON file")
    args = parser.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")
    if cuda:
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
            if dtype != torch.float32:
                exact = copy.deepcopy(model).float()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    gathered = [torch.empty_like(sharded) for _ in range(world)]
    dist.all_gather(gathered, sharded)
    if rank == 0:
        report = {
            "shape": args.shape, "layers": args.layers, "dtype": args.dtype, "world_size": world,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "ranks_identical": all(torch.equal(g_, gathered[0]) for g_ in gathered),
            "max_abs_diff": (sharded.float() - full.float()).abs().max().item(),
            "logit_scale": full.float().abs().max().item(),
            "greedy_tokens_equal": torch.equal(tokens, ref_tokens),
            "first_token_mismatch": next((i for i in range(tokens.shape[1]) if tokens[0, i] != ref_tokens[0, i]), None),
            "params_bytes_rank0": sum(p.numel() * p.element_size() for p in gm.parameters()),
            "params_bytes_full": sum(p.numel() * p.element_size() for p in model.parameters()),
        }
        if dtype != torch.float32:
            report.update(rounding_verdict(sharded, full, exact, mask))
        print("RESULT " + json.dumps(report), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
