"""The `fxtp` command line.

    fxtp demo [--arch llama] [--world-size 2]             shard a tiny model, run it on real processes, check it
    fxtp dump MODEL_OR_CONFIG --world-size N [--rank R] [--decode [--batch B --max-length L]]
                                                          print the plan and rank graphs (fxtp.dump); with
                                                          --decode, of the static-KV-cache generation step

MODEL_OR_CONFIG is a tiny architecture from fxtp.tiny_configs (e.g. "llama") or a path to a HF
config (a directory holding config.json, or the file itself). A config's model is built on the
meta device, so no weight is ever allocated (a 70B config dumps on a small machine): the class
the config's `architectures` names (else the causal-LM, seq2seq-LM or masked-LM class of its
kind), in the config's dtype (float32 where it names none); no remote code runs. A tiny
architecture's model is built on the CPU in float32 with seeded random weights.
Exit codes: 0 success, 1 failure, 2 bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING)

import fxtp
from fxtp.capture.export import CaptureError
from fxtp.tiny_configs import LLAMA_FAMILY, tiny_config, tiny_model
from fxtp.runtime.rank_processes import RankFailure, run_ranks

__all__ = ["main"]

ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
DEMO_TOLERANCE = 1e-4
DEMO_BATCH, DEMO_SEQ, DEMO_PADDING = 2, 12, 4  # the first sequence is left-padded by DEMO_PADDING


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def main(argv: Optional[list[str]] = None) -> int:
    """Run the fxtp command line on `argv` (default: sys.argv[1:]) and return the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except UsageError as e:
        print(f"fxtp {args.name}: error: {e}", file=sys.stderr)
        return 2
    except CaptureError as e:
        print(f"fxtp {args.name}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxtp", description="Automatic tensor parallelism for HF transformers "
                                                              "(causal LMs, seq2seq LMs, encoders).")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="shard a tiny model, run every rank in its own process (gloo) "
                                            "and compare with the unsharded model")
    demo.add_argument("--arch", default="llama", help=f"tiny architecture (default llama; one of "
                                                      f"{', '.join(LLAMA_FAMILY)})")
    demo.add_argument("--world-size", type=int, default=2, help="number of ranks (default 2)")
    demo.set_defaults(command=_demo, name="demo")

    dump = commands.add_parser("dump", help="print the sharded program (plan, layouts, collectives)")
    dump.add_argument("model", metavar="MODEL_OR_CONFIG",
                      help="tiny architecture name (e.g. llama) or path to a HF config directory / config.json")
    dump.add_argument("--world-size", type=int, required=True, help="number of ranks")
    dump.add_argument("--rank", type=int, default=0,
                      help="the rank whose graph the collectives are counted on (default 0; all run the same ones)")
    dump.add_argument("--decode", action="store_true",
                      help="dump the generation step with a static KV cache (prefill and decode) instead")
    dump.add_argument("--batch", type=int, default=1, help="batch size of the --decode cache (default 1)")
    dump.add_argument("--max-length", type=int, default=256, help="tokens the --decode cache holds (default 256)")
    dump.set_defaults(command=_dump, name="dump")
    return parser


# --- building models -------------------------------------------------------------------------

def build_model(spec: str) -> torch.nn.Module:
    """An eval-mode model from a HF config path, on the meta device (no weights), or, if no such
    path exists, a tiny architecture's model with seeded random weights."""
    if os.path.exists(spec):
        return meta_model(_read_config(spec), spec)
    if os.sep in spec or spec.endswith(".json"):
        raise UsageError(f"{spec}: no such file or directory")
    return _tiny(spec)


def _tiny(arch: str) -> torch.nn.Module:
    try:
        tiny_config(arch)
    except ValueError as e:
        raise UsageError(f"{e}; or pass a path to a HF config directory or config.json") from None
    return tiny_model(arch)


def _read_config(path: str):
    try:  # trust_remote_code=False: a config that needs code from the Hub fails here instead of prompting
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"could not read a HF config from {path}: {e}") from None


def model_class(config, source: str) -> type:
    """The transformers class `config.architectures` names (its first), else the class transformers
    maps the config to for its kind, decided as fxtp/capture/signatures.py decides it for a model:
    a seq2seq LM if the config is encoder-decoder, a masked LM if its model type has a masked-LM
    class and it is not configured as a decoder, a causal LM otherwise. `source` names the config
    in errors."""
    if config.architectures:
        name = config.architectures[0]
        found = getattr(transformers, name, None)
        if not (isinstance(found, type) and issubclass(found, PreTrainedModel)):
            raise UsageError(f"{source}: the config's architectures names {name}, which transformers "
                             f"{transformers.__version__} does not have (fxtp runs no remote code): set architectures "
                             f"to a transformers model class, or remove it to build the class of the model's kind")
        return found
    if getattr(config, "is_encoder_decoder", False):
        kind, mapping = "seq2seq LM", MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    elif config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        kind, mapping = "masked LM", MODEL_FOR_MASKED_LM_MAPPING
    else:
        kind, mapping = "causal LM", MODEL_FOR_CAUSAL_LM_MAPPING
    if type(config) not in mapping:
        raise UsageError(f"{source}: transformers has no {kind} class for model type {config.model_type!r} and the "
                         f"config names no architectures: add the model class to its architectures")
    return mapping[type(config)]


def meta_model(config, source: str) -> torch.nn.Module:
    """The model `config` describes (see model_class) on the meta device, in the config's dtype
    (float32 where it names none): its shapes and graph without allocating a weight."""
    cls = model_class(config, source)
    with torch.device("meta"):
        # _from_config is what transformers' Auto*.from_config calls: the class's init in `dtype`,
        # with the buffers that transformers keeps in float32 (rotary frequencies) left so
        model = cls._from_config(config, dtype=config.dtype or torch.float32)
    return model.eval()


def _compile(model: torch.nn.Module, world_size: int) -> "fxtp.TPProgram":
    try:
        return fxtp.compile(model, world_size)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


# --- fxtp dump -------------------------------------------------------------------------------

def _dump(args) -> int:
    if args.world_size >= 1 and not 0 <= args.rank < args.world_size:
        raise UsageError(f"--rank must be in [0, {args.world_size}), got {args.rank}")
    if args.batch < 1 or args.max_length < 1:
        raise UsageError(f"--batch and --max-length must be positive, got {args.batch} and {args.max_length}")
    tp = _compile(build_model(args.model), args.world_size)
    if args.decode:
        tp = tp.with_cache(args.batch, args.max_length)
    print(fxtp.dump(tp, rank=args.rank))
    return 0


# --- fxtp demo -------------------------------------------------------------------------------

def demo_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed demo batch: seeded token ids and a mask whose first row is left-padded."""
    ids = torch.randint(1, vocab_size, (DEMO_BATCH, DEMO_SEQ), generator=torch.Generator().manual_seed(1234))
    mask = torch.ones(DEMO_BATCH, DEMO_SEQ, dtype=torch.long)
    mask[0, :DEMO_PADDING] = 0
    return ids, mask


def demo_rank(rank: int, arch: str, world_size: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One rank of the demo, in its own process: build the same seeded model, compile, run its shard."""
    tp = fxtp.compile(tiny_model(arch), world_size)
    gm = tp.module(rank)
    with torch.no_grad():
        return gm(ids, mask)


def _demo(args) -> int:
    start = time.perf_counter()
    model = _tiny(args.arch)
    tp = _compile(model, args.world_size)
    config = model.config
    print(f"fxtp demo: tiny {args.arch} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads, {getattr(config, 'num_key_value_heads', '?')} kv heads), "
          f"world size {args.world_size}")
    print(plan_summary(tp))
    rank0 = tp.rank_graph(0)
    reduces = sum(1 for n in rank0.graph.nodes if n.target is ALL_REDUCE)
    print(f"rank 0 graph: {len(rank0.graph.nodes)} nodes, {reduces} all_reduce")

    ids, mask = demo_batch(config.vocab_size)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    print(f"running {args.world_size} ranks in separate processes (gloo), batch {DEMO_BATCH} x seq {DEMO_SEQ}, "
          f"first row left-padded by {DEMO_PADDING} ...")
    try:
        outputs = run_ranks(demo_rank, args.world_size, args.arch, args.world_size, ids, mask)
    except (RankFailure, TimeoutError) as e:
        print(f"FAIL: {e}")
        return 1
    diffs = []
    for rank, logits in enumerate(outputs):
        if logits.shape != expected.shape:
            print(f"  rank {rank}: logits {list(logits.shape)}, expected {list(expected.shape)}")
            diffs.append(float("inf"))
            continue
        diffs.append((logits - expected).abs().max().item())
        print(f"  rank {rank}: logits {list(logits.shape)}, max |diff| vs unsharded = {diffs[-1]:.2e}")
    worst = torch.tensor(diffs).max().item()  # torch's max keeps a NaN, Python's may not
    passed = worst <= DEMO_TOLERANCE
    print(f"{'PASS' if passed else 'FAIL'}: max |diff| {worst:.2e} {'<=' if passed else '>'} {DEMO_TOLERANCE:g} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0 if passed else 1


def plan_summary(tp: "fxtp.TPProgram") -> str:
    """One line per projection group: column-parallel, row-parallel or replicated, with the planner's reason."""
    lines = [f"plan ({len(tp.plan.groups)} projection groups):"]
    for group in tp.plan.groups:
        line = f"  {group.role:<16} {_group_name(group.weights)}"
        if group.reason and group.role != "row-parallel":
            line += f"  ({group.reason})"
        lines.append(line)
    return "\n".join(lines)


def _group_name(weights: list[str]) -> str:
    """model.layers.0.mlp.{gate_proj,up_proj} for weights sharing a module prefix."""
    parts = [w.removesuffix(".weight").split(".") for w in weights]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    leaves = [".".join(p[common:]) for p in parts]
    if len(leaves) == 1:
        return ".".join(filter(None, (prefix, leaves[0])))
    return f"{prefix}.{{{','.join(leaves)}}}" if prefix else ", ".join(leaves)


if __name__ == "__main__":
    sys.exit(main())
