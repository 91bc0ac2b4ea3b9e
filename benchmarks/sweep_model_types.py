"""Sweep every other decoder-only model type of the installed transformers at 2, 3 and 4 ranks.

    python benchmarks/sweep_model_types.py [--types T ...] [--jobs 1] [--timeout 600]
        [--experts-implementation batched_mm]
    python benchmarks/sweep_model_types.py --write-markdown

Candidates: the model types of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES that are not in
fxtp.tiny_configs.CAUSAL_LMS (those have the architecture table, benchmarks/arch_table.py). Each is
built from fxtp.tiny_configs.generic_tiny_config (hidden 64, 4 heads, 2 kv heads, 2 layers, vocab
256, 4 experts), in float32, and compiled at each world size; each rank's simulated logits are
compared with the unsharded model (max abs diff <= 1e-4, left-padded batch); the type is
captured once and planned per world size, as fxtp.compile would. Per world size the
row says exact, refused (fxtp's CaptureError or ValueError: the reason it gives the user), error
(the stage and message) or WRONG (the difference; the run then exits with status 1), and the
parameters-only fraction per rank: the most parameter bytes a rank holds over the unsharded
model's (buffers excluded), with the biggest parameter the plan keeps replicated and why.
Skipped, with the reason: encoder-decoder models, encoders (their causal LM head is a decoder of
an encoder-decoder) and multimodal wrappers. Types run in worker processes (benchmarks/sweep_worker.py):
a crash or a hang costs one row, and the world sizes it finished before a timeout are kept. fxtp is this checkout's,
whichever the environment has installed (benchmarks/this_checkout.py).

Rows merge by model type into benchmarks/results/model_types_sweep.json, one section per
transformers version (and experts implementation), so runs over parts of the list (`--types`)
add up and versions stay apart. `--write-markdown` writes model_types_sweep.md and README's sweep
paragraph from that JSON (benchmarks/sweep_report.py). `--experts-implementation` runs MoE experts
through another of transformers' implementations than its default `grouped_mm` (`batched_mm`: what
HF's generate and the executorch exporter switch to), for the types that can set one.
"""
from __future__ import annotations

import argparse
import datetime
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the modules beside it
import sweep_report  # noqa: E402
import sweep_worker  # noqa: E402
import this_checkout  # noqa: E402

this_checkout.use()  # this checkout's fxtp, here and in the children
WORLD_SIZES = (2, 3, 4)
MESSAGE_CHARS = sweep_worker.MESSAGE_CHARS


def candidates() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fxtp.tiny_configs import CAUSAL_LMS
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in CAUSAL_LMS)


def skip_reason(model_type: str, config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    from fxtp.tiny_configs import MULTIMODAL_KEYS
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", True):
        return "encoder (causal LM head only as the decoder of an encoder-decoder)"
    present = [k for k in MULTIMODAL_KEYS if getattr(config, k, None) is not None]
    return f"multimodal wrapper ({', '.join(present)})" if present else ""


def short(e: BaseException) -> str:
    """An exception as one line of the table: its type and the start of its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:MESSAGE_CHARS]}"


def parameter_state_names(tp, model) -> set[str]:
    """The program's state names that hold parameters: the model's, and the pieces capture cut out of
    them (fxtp.capture.state_names.derived_name: an unfused q|k|v, Mamba-2's in_proj cut in five)."""
    from fxtp.capture.state_names import parse_derived

    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name for name in tp.captured.state if (parse_derived(name) or (name,))[0] in names}


def parameter_shares(tp, model) -> dict:
    """Parameter bytes per rank over the unsharded model's (buffers excluded): the fullest rank's,
    and the mean over ranks (what an even split of the same shards would give each rank)."""
    from fxtp.stats import planned_state_bytes

    names = parameter_state_names(tp, model)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    per_rank = [planned_state_bytes(tp, rank, names=names) / whole for rank in range(tp.world_size)]
    return {"params_per_rank": round(max(per_rank), 4), "params_mean": round(sum(per_rank) / len(per_rank), 4)}


def biggest_replicated(tp, model) -> str:
    """The biggest parameter the plan keeps whole on every rank, its share of the parameters, and
    the plan's reason for it."""
    from fxtp.node_meta import LAYOUT, STATE
    from fxtp.sharding.layouts import Shard
    from fxtp.sharding.roles import Role
    from fxtp.stats import held_state

    names = parameter_state_names(tp, model)
    replicated = [n.meta[STATE] for n in held_state(tp.graph)
                  if n.meta[STATE] in names and not isinstance(n.meta[LAYOUT], Shard)]
    if not replicated:
        return ""
    name = max(replicated, key=lambda s: tp.captured.state[s].numel())
    share = tp.captured.state[name].numel() / sum(p.numel() for p in model.parameters())
    reason = "in no projection group"
    if looked_up_by_position(tp.graph, name):
        reason = "a table looked up by positions or token types, not token ids: whole on every rank, as Megatron keeps it"
    for group in (g for g in tp.plan.groups if name in g.weights):
        whole = group.role is Role.REPLICATED or name in group.dropped  # the plan says why in its reason
        kept = [line.strip() for line in group.reason.splitlines() if name in line and "kept replicated" in line]
        reason = (group.reason.splitlines()[0] if whole else kept[0] if kept
                  else f"in a {group.role} group, left whole by the rules")
    return f"{name} ({share:.2f} of parameters): {reason}"[:MESSAGE_CHARS]


def looked_up_by_position(graph, name: str) -> bool:
    """Whether state `name` is an embedding table that no token ids index (fxtp plans token tables only)."""
    import torch
    from fxtp.node_meta import STATE
    from fxtp.passes.sharding.plan import token_embeddings

    tokens = {node.args[0] for node in token_embeddings(graph)}
    return any(node.op == "placeholder" and node.meta.get(STATE) == name and node not in tokens
               and any(user.target is torch.ops.aten.embedding.default for user in node.users)
               for node in graph.graph.nodes)


def measure_size(model, captured, world_size: int, ids, mask) -> dict:
    """One world size: the program from the type's capture (fxtp.compile's plan, without its export
    again), then every rank's logits against the unsharded model's."""
    from fxtp.stats import collectives_per_layer_text
    from fxtp.testing import assert_equivalent, program_of_capture

    try:
        tp = program_of_capture(captured, world_size, model)
    except ValueError as e:  # fxtp's refusals: the reason and what to do
        return {"result": "refused", "detail": short(e)}
    except Exception as e:
        return {"result": "error", "detail": f"compile: {short(e)}"}
    found = {**parameter_shares(tp, model), "biggest_replicated": biggest_replicated(tp, model)}
    try:
        found["max_abs_diff"] = assert_equivalent(model, world_size, ids, mask, program=tp)
    except AssertionError as e:  # a rank's logits differ from the unsharded model's
        return {**found, "result": "wrong", "detail": short(e)}
    except Exception as e:
        return {**found, "result": "error", "detail": f"simulate: {short(e)}"}
    return {**found, "result": "exact", "all_reduce_per_layer": collectives_per_layer_text(tp.rank_graph(0))}


def measure(model_type: str, experts_implementation: str = "", emit=lambda row: None) -> dict:
    """One row: why the type is skipped or does not build (config, model, forward), or each world
    size's result; `emit` gets the row after each step (the parent keeps it if a later one hangs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fxtp.capture.export import CaptureError, capture
    from fxtp.runtime.compile_arguments import config_heads
    from fxtp.tiny_configs import generic_tiny_config

    row = {"model_type": model_type, "run_on": datetime.date.today().isoformat(), "sizes": {}}
    stage = "config"
    try:
        config = generic_tiny_config(model_type)
        row["heads"] = config_heads(config)
        row["skipped"] = skip_reason(model_type, config)
        if row["skipped"]:
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
    except Exception as e:  # the shrunk config does not fit the type: the row says where
        row["build_failure"] = f"{stage}: {short(e)}"
        return row
    emit(row)
    try:
        captured = capture(model)  # once for every world size: export is most of fxtp.compile's time
    except CaptureError as e:  # fxtp's refusal at every world size
        row["sizes"] = {str(ws): {"result": "refused", "detail": short(e)} for ws in WORLD_SIZES}
        return row
    except Exception as e:
        row["sizes"] = {str(ws): {"result": "error", "detail": f"capture: {short(e)}"} for ws in WORLD_SIZES}
        return row
    for ws in WORLD_SIZES:
        row["sizes"][str(ws)] = measure_size(model, captured, ws, ids, mask)
        emit(row)
    return row


def sweep(model_types: list[str], jobs: int, timeout: int, experts_implementation: str):
    """Each type's row, in order, from `jobs` worker processes (benchmarks/sweep_worker.py)."""
    command = [sys.executable, __file__, "--worker", "--experts-implementation", experts_implementation]
    idle: queue.Queue = queue.Queue()
    for _ in range(jobs):
        idle.put(sweep_worker.Worker(command))

    def one(model_type: str) -> dict:
        worker = idle.get()
        try:
            return worker.measure(model_type, timeout, WORLD_SIZES)
        finally:
            idle.put(worker)

    with ThreadPoolExecutor(jobs) as pool:
        yield from pool.map(one, model_types)
    while not idle.empty():
        idle.get().close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="*", help="model types (default: every candidate)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model type")
    parser.add_argument("--experts-implementation", default="",
                        help="transformers' experts implementation for MoE types (default: the model's own default)")
    parser.add_argument("--results", default=sweep_report.RESULTS_JSON, help="the JSON the rows merge into")
    parser.add_argument("--write-markdown", action="store_true",
                        help="write the markdown table and README's sweep paragraph from the JSON, run nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a child: types on stdin
    args = parser.parse_args()
    if args.worker:
        sweep_worker.serve(lambda model_type, emit: measure(model_type, args.experts_implementation, emit))
        return
    if args.write_markdown:
        sweep_report.write_markdown(args.results)
        return
    import torch
    import transformers
    section = sweep_report.Section(transformers.__version__, torch.__version__, args.experts_implementation)
    sweep_report.merge(args.results, section, [], candidates())
    wrong = []
    for row in sweep(args.types or candidates(), args.jobs, args.timeout, args.experts_implementation):
        sweep_report.merge(args.results, section, [row])  # each row as it comes: a stopped run keeps them
        print(sweep_report.row_line(row), flush=True)
        wrong += [f"{row['model_type']} N={ws}" for ws, r in row["sizes"].items() if r["result"] == "wrong"]
    if wrong:
        sys.exit(f"WRONG results (a rank's logits differ from the unsharded model's): {', '.join(wrong)}")


if __name__ == "__main__":
    main()
