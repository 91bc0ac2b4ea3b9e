"""Where a long prompt's prefill spends its GPU time: the CUDA kernels of one prefill of fxtp's
compiled step (fxtp-compile-n1) against HF's with a static cache (eager: HF's compiled generate
compiles its decode call only), on one GPU, from the same process.

    python benchmarks/prefill_profile.py --shape llama3-8b --prompt-len 8192 --out prefill_profile.json

Each prefill is a generate of one new token (the prompt's step and its argmax), run twice untimed
(compiling), then once under torch.profiler; kernels are grouped by name and ranked by their total
time. Kernels of one kind (GEMMs, attention) name the same work differently in the two, so compare
the ranked lists and the busy totals, not line by line.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import fxtp
from hf_generate_speed import build


def kernels(run, top: int) -> dict:
    """CUDA busy time of one `run()` and its `top` kernels by total time (name -> [calls, ms])."""
    run()
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiled:
        run()
        torch.cuda.synchronize()
    totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for event in profiled.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += 1
            totals[event.name][1] += event.device_time / 1e3
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    return {"busy_ms": sum(ms for _, ms in totals.values()), "kernels": len(ranked),
            "top": {name[:160]: [calls, round(ms, 3)] for name, (calls, ms) in ranked[:top]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda")
    model = build(args.shape, getattr(torch, args.dtype), device)
    ids = torch.randint(3, min(model.config.vocab_size, 32000), (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    generator = fxtp.compile(model, 1, capture_on_first_use=True).generator(0, device=device, compile=True)
    result = {"fxtp-compile-n1": kernels(lambda: generator.generate(ids, mask, max_new_tokens=1, eos_token_id=[]),
                                         args.top)}
    del generator
    torch.cuda.empty_cache()
    result["hf static cache"] = kernels(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=1,
                                                               cache_implementation="static", pad_token_id=0,
                                                               do_sample=False), args.top)
    for name, profiled in result.items():
        print(f"{name}: {profiled['busy_ms']:.2f} ms busy in {profiled['kernels']} kernel names")
        for kernel, (calls, ms) in profiled["top"].items():
            print(f"  {ms:9.3f} ms {calls:5d}x  {kernel}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(result, shape=args.shape, batch=args.batch, prompt_len=args.prompt_len,
                           device=torch.cuda.get_device_name(), torch=torch.__version__), f, indent=2)


if __name__ == "__main__":
    main()
