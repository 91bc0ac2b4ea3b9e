"""Measure which architectures fxtp shards exactly and print the README's table (markdown).

    python benchmarks/arch_table.py            # tiny configs of fxtp.tiny_configs, world sizes 1-4

Per architecture: the world sizes whose simulated output (logits) matches the unsharded model
(float32, max abs diff <= 1e-4, left-padded batch; seq2seq decoder inputs padded too), the worst
difference, all_reduce per layer in rank 0's graph (encoder and decoder layers of seq2seq
models: "2,3"), and rank 0's share of the layers' parameters at world size 2.
"""
from __future__ import annotations

import argparse

import fxtp
from fxtp.tiny_configs import LLAMA_FAMILY, tiny_model
from fxtp.stats import collectives_per_layer_text, state_bytes
from fxtp.testing import assert_equivalent, padded_batch


def measure(arch: str, world_sizes: list[int]) -> str:
    model = tiny_model(arch)
    batch = padded_batch(model)
    passing, worst, per_layer, share = [], 0.0, "", ""
    for ws in world_sizes:
        try:
            tp = fxtp.compile(model, ws)
            worst = max(worst, assert_equivalent(model, ws, **batch, program=tp))
        except Exception as e:  # the table reports failures instead of stopping
            print(f"<!-- {arch} world_size={ws}: {type(e).__name__}: {str(e).splitlines()[0][:200]} -->")
            continue
        passing.append(ws)
        if ws == 2:
            rank0 = tp.rank_graph(0)
            per_layer = collectives_per_layer_text(rank0)
            share = f"{state_bytes(rank0, layers_only=True) / state_bytes(model, layers_only=True):.3f}"
    return f"| {arch} | {', '.join(map(str, passing))} | {worst:.1e} | {per_layer} | {share} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(LLAMA_FAMILY))
    parser.add_argument("--world-sizes", nargs="*", type=int, default=[1, 2, 3, 4])
    args = parser.parse_args()
    print("| architecture | world sizes exact | max abs diff | all_reduce / layer (N=2) | layer params on rank 0 (N=2) |")
    print("|---|---|---|---|---|")
    for arch in args.archs:
        print(measure(arch, args.world_sizes), flush=True)


if __name__ == "__main__":
    main()
