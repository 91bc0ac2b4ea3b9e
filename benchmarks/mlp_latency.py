"""Microseconds per Llama MLP at batch 1 (gate|up GEMV, silu(gate) * up, down GEMV, residual add),
compiled as the decode step is (coordinate descent, PDL) and replayed as one CUDA graph of `--layers`
MLPs with their own weights: inductor's default, which recomputes silu(gate) * up inside the down
GEMV, against `DecodeOptions.store_gemv_inputs` (passes/decode/store_gemv_inputs.py), which stores it first. The
variants take turns, `--rounds` times; a row gives the fastest round.

    python benchmarks/mlp_latency.py --inner 14336 --ranks 1,2 --out mlp.json

GPU only: on the CPU inductor does not turn one-row matmuls into the reductions the pass is for.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from decode_floor import hbm_bandwidth  # benchmarks/, beside this script
from kernel_timing import add_turn_arguments, as_cuda_graph, fastest_in_turns, step_inductor_options

VARIANTS = {"inlined": False, "stored": True}  # DecodeOptions.store_gemv_inputs


def mlps(x: torch.Tensor, weights: list) -> torch.Tensor:
    for gate_up, down in weights:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        x = x + F.linear(F.silu(gate) * up, down)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096, help="Llama-3-8B: 4096")
    parser.add_argument("--inner", type=int, default=14336, help="the whole model's intermediate size")
    parser.add_argument("--ranks", default="1,2", help="GPUs sharing the MLP: each holds 1/N of the inner rows")
    parser.add_argument("--layers", type=int, default=8, help="MLPs a replay, each with its own weights")
    add_turn_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no GPU here: inductor makes one-row matmuls reductions on GPUs only, which is what it times")
    ranks = [int(n) for n in args.ranks.split(",")]
    if any(args.inner % n for n in ranks):
        parser.error(f"--ranks {args.ranks} must each divide --inner {args.inner}")
    dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    bandwidth = hbm_bandwidth(device, None)  # by GPU name; None for GPUs it does not know
    rows = []
    for n in ranks:
        inner = args.inner // n
        generator = torch.Generator(device).manual_seed(n)
        weights = [(torch.randn(2 * inner, args.hidden, generator=generator, device=device, dtype=dtype) / args.hidden ** 0.5,
                    # small, so that the residual stays near 1 across the layers with no norm between them
                    torch.randn(args.hidden, inner, generator=generator, device=device, dtype=dtype) / (10 * inner ** 0.5))
                   for _ in range(args.layers)]
        x = torch.randn(1, args.hidden, generator=generator, device=device, dtype=dtype)
        reference = mlps(x, weights).float()
        row = {"ranks": n, "inner_per_rank": inner, "us_per_layer": {}, "max_diff": {},
               "bytes_per_layer": sum(a.nbytes + b.nbytes for a, b in weights) // args.layers}
        replays = {}
        for name, stored in VARIANTS.items():
            torch._dynamo.reset()
            compiled = torch.compile(mlps, fullgraph=True, dynamic=False, options=step_inductor_options(stored))
            row["max_diff"][name] = (compiled(x, weights).float() - reference).abs().max().item()
            replays[name] = as_cuda_graph(lambda: compiled(x, weights))
        row["us_per_layer"] = fastest_in_turns(replays, args.reps, args.rounds, args.layers)
        rows.append(row)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, us per MLP layer (fastest of {args.rounds} rounds)"
          + (f", share of {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""))
    print("| N | inner per rank | " + " | ".join(VARIANTS) + " | max diff |")
    print("|---" * (3 + len(VARIANTS)) + "|")
    for row in rows:
        cells = [f"{us:.1f}" + (f" ({row['bytes_per_layer'] / bandwidth * 1e6 / us:.0%})" if bandwidth else "")
                 for us in row["us_per_layer"].values()]
        print(f"| {row['ranks']} | {row['inner_per_rank']} | " + " | ".join(cells)
              + f" | {max(row['max_diff'].values()):.3g} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
