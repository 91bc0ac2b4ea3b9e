"""Sweep every other decoder-only model type of the installed transformers; print a markdown table.

    PYTHONPATH=. python benchmarks/sweep_model_types.py [--types T ...] [--jobs 2] [--timeout 300]
        [--experts-implementation batched_mm]

Candidates: the model types of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES that are not in
fxtp.tiny_configs.CAUSAL_LMS (those have the architecture table). Each is built from
fxtp.tiny_configs.generic_tiny_config (hidden 64, 4 heads, 2 kv heads, 2 layers, vocab 256, 4
experts), in float32, and compiled at world sizes 2 and 4; each rank's simulated logits are
compared with the unsharded model (max abs diff <= 1e-4, left-padded batch). Skipped, with the
reason: encoder-decoder models, encoders (their causal LM head is a decoder of an
encoder-decoder) and multimodal wrappers. Each type runs in its own process (a crash or a
hang costs one row). `--experts-implementation` runs MoE experts through another of transformers'
implementations than its default `grouped_mm` (`batched_mm`: what HF's generate and the
executorch exporter switch to; `eager`: the model's own loop), for the types that can set one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's fxtp, in the children
WORLD_SIZES = (2, 4)
COLUMNS = ("model type", "exported", "world sizes exact", "max abs diff", "all_reduce / layer (N=2)",
           "state sharded (N=2)", "failure")


def candidates() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fxtp.tiny_configs import CAUSAL_LMS
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in CAUSAL_LMS)


def skip_reason(model_type: str, config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from fxtp.tiny_configs import MULTIMODAL_KEYS
    if getattr(config, "is_encoder_decoder", False):
        return "skipped: encoder-decoder"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", True):
        return "skipped: encoder (causal LM head only as the decoder of an encoder-decoder)"
    present = [k for k in MULTIMODAL_KEYS if getattr(config, k, None) is not None]
    return f"skipped: multimodal wrapper ({', '.join(present)})" if present else ""


def sharded_fraction(tp) -> float:
    """Bytes of state the plan shards, over all state the graph reads."""
    from fxtp.node_meta import LAYOUT, STATE
    from fxtp.sharding.layouts import Shard

    sharded = total = 0
    for node in tp.graph.graph.nodes:
        if node.op == "placeholder" and STATE in node.meta and node.users:
            value = tp.captured.state[node.meta[STATE]]
            size = value.numel() * value.element_size()
            total += size
            sharded += size if isinstance(node.meta[LAYOUT], Shard) else 0
    return sharded / total


def measure(model_type: str, experts_implementation: str = "") -> dict:
    """One row: which stage failed (config, model, forward, export, fxtp, exact) and why, or the numbers."""
    import torch
    from transformers import AutoModelForCausalLM

    import fxtp
    from fxtp.capture.export import CaptureError
    from fxtp.tiny_configs import generic_tiny_config
    from fxtp.stats import OUTSIDE_LAYERS, collectives_by_layer
    from fxtp.testing import assert_equivalent

    row = {"model type": model_type, "exported": "", "world sizes exact": "", "max abs diff": "",
           "all_reduce / layer (N=2)": "", "state sharded (N=2)": "", "failure": ""}
    stage, exact, worst = "config", [], 0.0
    try:
        config = generic_tiny_config(model_type)
        row["failure"] = skip_reason(model_type, config)
        if row["failure"]:
            return row
        stage = "model"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).float().eval()
        if experts_implementation and model._can_set_experts_implementation():
            model.set_experts_implementation(experts_implementation)
        ids = torch.randint(3, 256, (3, 13), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        stage = "forward"
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for ws in WORLD_SIZES:
            stage = f"fxtp N={ws}"
            try:
                tp = fxtp.compile(model, ws)
            except CaptureError:
                stage = "export"
                raise
            row["exported"] = "yes"
            stage = f"exact N={ws}"
            worst = max(worst, assert_equivalent(model, ws, ids, mask, program=tp))
            exact.append(ws)
            if ws == 2:
                counts = {sum(c.values()) for layer, c in collectives_by_layer(tp.rank_graph(0)).items()
                          if layer != OUTSIDE_LAYERS}
                row["all_reduce / layer (N=2)"] = ",".join(map(str, sorted(counts)))
                row["state sharded (N=2)"] = f"{sharded_fraction(tp):.2f}"
        row["world sizes exact"], row["max abs diff"] = ", ".join(map(str, exact)), f"{worst:.1e}"
    except Exception as e:  # the table reports failures instead of stopping
        row["exported"] = row["exported"] or ("no" if stage == "export" else "")
        row["world sizes exact"] = ", ".join(map(str, exact))
        message = " ".join(str(e).split())[:160].replace("|", "/")
        row["failure"] = f"{stage}: {type(e).__name__}: {message}"
    return row


def run_one(model_type: str, timeout: int, experts_implementation: str = "") -> dict:
    """measure(model_type, experts_implementation) in a fresh process."""
    try:
        done = subprocess.run([sys.executable, __file__, "--one", model_type,
                               "--experts-implementation", experts_implementation], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})
    except subprocess.TimeoutExpired:
        return {"model type": model_type, "failure": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])[:160].replace("|", "/")
        return {"model type": model_type, "failure": f"process exited with {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="*", help="model types (default: every candidate)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model type")
    parser.add_argument("--experts-implementation", default="",
                        help="transformers' experts implementation for MoE types (default: the model's own default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one JSON row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.experts_implementation)))
        return
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda t: run_one(t, args.timeout, args.experts_implementation), args.types or candidates()):
            print("| " + " | ".join(row.get(c, "") for c in COLUMNS) + " |", flush=True)


if __name__ == "__main__":
    main()
