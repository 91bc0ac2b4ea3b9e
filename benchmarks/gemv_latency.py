"""Microseconds per one-row projection (GEMV) at a decode step's weight shapes: inductor's GEMV
(`F.linear` compiled as the decode step is: coordinate descent, PDL) against fxtp's GEMV kernel
(fxtp/kernels/gemv.py) at several block sizes, and launched with PDL (fxtp/kernels/dependent_launch.py): loading its first weights
after its wait, before it ("preload", at its default blocks and at larger ones), or after it with an
L2 prefetch of the first 8, 16 or 32 MB. Then the same after a latency-bound
kernel of one program, which releases its dependents at once as push all_reduce does: `--gap-us`
of spinning, or `--gap-loads` dependent loads from L2 as push polls its buffer (a time that grows
if the prefetch slows them); there the prefetching GEMV can stream its weights meanwhile. A row
replays one CUDA graph of `--copies` GEMVs over weights of their own (more bytes than L2 holds),
`--rounds` times in turns with the other variants, and gives the fastest round.

    python benchmarks/gemv_latency.py --shape llama3-8b --ranks 1,2 --out gemv.json

GPU only (Ampere or later; PDL and the prefetch need Hopper).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch
import torch.nn.functional as F

from decode_floor import hbm_bandwidth  # benchmarks/, beside this script
from fxtp.kernels import gemv
from fxtp.kernels.dependent_launch import launching_with_pdl, uses_pdl
from kernel_timing import add_turn_arguments, as_cuda_graph, fastest_in_turns, step_inductor_options
from random_model import model_config

# (BLOCK_N, BLOCK_K, num_warps); inductor's reduction heuristics start its GEMVs at 16 warps (XBLOCK 2 or 1,
# R0_BLOCK 2048 at N=2's o and down) before coordinate descent moves them
BLOCKS = list(itertools.product((1, 2, 4), (1024, 2048), (4, 8, 16)))
PRELOAD_BLOCKS = [(1, 4096, 8), (2, 2048, 8)]  # more of a program's weights loaded before its wait


def projections(config, ranks: int) -> dict:
    """{name: (rows, columns)} of one rank's weights: merged q|k|v and gate|up as the step merges them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * head_dim
    return {"q|k|v": ((hidden + 2 * kv) // ranks, hidden), "o": (hidden, hidden // ranks),
            "gate|up": (2 * inner // ranks, hidden), "down": (hidden, inner // ranks),
            "lm_head": (config.vocab_size // ranks, hidden)}


@functools.cache
def _gap_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def spin(nanoseconds, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        start = tl.extra.cuda.globaltimer()
        while tl.extra.cuda.globaltimer() - start < nanoseconds:
            pass

    @triton.jit
    def chase(ring_ptr, out_ptr, loads, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        index = 0
        for _ in range(loads):  # each load's address is the one before's value, from L2 (volatile)
            index = tl.load(ring_ptr + index, volatile=True)
        tl.store(out_ptr, index)

    return spin, chase


def in_turn(weights: list, one, pdl: bool = False, gap=None):
    """A call of `one(w)` for each of `weights`, each after `gap()` if given, launched with PDL if `pdl`:
    what a replay times."""
    def run():
        with launching_with_pdl(pdl):
            outs = []
            for w in weights:
                if gap:
                    gap()
                outs.append(one(w))
            return outs
    return run


class Gap:
    """A latency-bound kernel of one program that, with PDL, waits for the kernel before and releases
    the one after at once, as push all_reduce does: it spins `us` microseconds ("spin"), or makes
    `loads` dependent loads from L2 as push polls its buffer ("chase"), whose time grows if other
    traffic slows them."""

    def __init__(self, kind: str, amount: float, device: torch.device):
        self.kind, self.amount, self.device = kind, amount, device
        lines = 4096  # 512 KB: in L2
        stride = 128 // 4
        self.ring = torch.zeros(lines * stride, dtype=torch.int32, device=device)
        self.ring[::stride] = (torch.arange(1, lines + 1, device=device) % lines) * stride
        self.out = torch.zeros(1, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        spin, chase = _gap_kernels()
        pdl = uses_pdl(self.device)
        if self.kind == "spin":
            spin[(1,)](int(self.amount * 1000), PDL=pdl, launch_pdl=pdl)
        else:
            chase[(1,)](self.ring, self.out, int(self.amount), PDL=pdl, launch_pdl=pdl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", help="a config name of inference_test.py")
    parser.add_argument("--ranks", default="1,2", help="GPUs sharing each weight: a rank holds 1/N of its rows or columns")
    parser.add_argument("--copies", type=int, default=8, help="GEMVs a replay, each over its own weight")
    parser.add_argument("--gap-us", type=float, default=5.0, help="a spinning kernel before each GEMV")
    parser.add_argument("--gap-loads", type=int, default=16, help="a kernel of dependent L2 loads before each GEMV")
    add_turn_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU here: this times GPU kernels")
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    bandwidth = hbm_bandwidth(device, None)
    inductor_linear = torch.compile(F.linear, fullgraph=True, dynamic=False, options=step_inductor_options())
    config = model_config(args.shape, None)
    rows_out = []
    for ranks in (int(n) for n in args.ranks.split(",")):
        for name, (rows, columns) in projections(config, ranks).items():
            generator = torch.Generator(device).manual_seed(rows + columns)
            weights = [torch.randn(rows, columns, generator=generator, device=device, dtype=dtype) / columns ** 0.5
                       for _ in range(args.copies)]
            x = torch.randn(1, columns, generator=generator, device=device, dtype=dtype)
            reference = [F.linear(x.float(), w.float()) for w in weights]
            gemvs = functools.partial(in_turn, weights)
            variants = {"inductor": gemvs(lambda w: inductor_linear(x, w))}
            for blocks in BLOCKS:
                variants["fxtp %dx%d/%dw" % blocks] = gemvs(lambda w, blocks=blocks: gemv.launch(x, w, blocks=blocks))
            gaps = {"": None, f" after {args.gap_us:g} us": Gap("spin", args.gap_us, device),
                    f" after {args.gap_loads} loads": Gap("chase", args.gap_loads, device)}
            for after, gap in gaps.items():
                if gap:
                    variants["inductor" + after] = gemvs(lambda w: inductor_linear(x, w), True, gap)
                variants["fxtp pdl" + after] = gemvs(lambda w: gemv.launch(x, w, prefetch_bytes=0, preload=False),
                                                     True, gap)
                for blocks in (None, *PRELOAD_BLOCKS):
                    label = "fxtp pdl+preload" + (" %dx%d/%dw" % blocks if blocks else "")
                    variants[label + after] = gemvs(
                        lambda w, blocks=blocks: gemv.launch(x, w, blocks=blocks, prefetch_bytes=0, preload=True), True, gap)
                for megabytes in (8, 16, 32):
                    variants[f"fxtp pdl+prefetch {megabytes} MB" + after] = gemvs(
                        lambda w, mb=megabytes: gemv.launch(x, w, prefetch_bytes=mb * 2 ** 20, preload=False), True, gap)
            row = {"ranks": ranks, "weight": name, "rows": rows, "columns": columns, "max_diff": {},
                   "bytes": weights[0].nbytes}
            replays = {}
            for variant, run in variants.items():
                row["max_diff"][variant] = max((out.float() - ref).abs().max().item() for out, ref in zip(run(), reference))
                replays[variant] = as_cuda_graph(run)
            row["us"] = fastest_in_turns(replays, args.reps, args.rounds, args.copies)
            share = (lambda us: f" ({row['bytes'] / bandwidth * 1e6 / us:.0%})") if bandwidth else (lambda us: "")
            print(f"N={ranks} {name} [{rows}, {columns}], max diff {max(row['max_diff'].values()):.3g}, us a GEMV "
                  f"(a GEMV and its gap after 'after'):", flush=True)
            print("    " + ", ".join(f"{variant.replace('fxtp ', '')} {us:.1f}{share(us) if 'after' not in variant else ''}"
                                     for variant, us in sorted(row["us"].items(), key=lambda item: item[1])), flush=True)
            rows_out.append(row)
            del weights, replays, variants
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
