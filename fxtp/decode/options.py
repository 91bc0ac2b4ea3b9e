"""The options of a rank's compiled decode step: which of fxtp's rewrites the step gets, how fxtp's
kernels launch in it, and the inductor options it and the prefill are compiled with.

Users pass `compile=True` (the defaults), a dict of DecodeOptions' fields or a DecodeOptions to
`tp.generator(rank, compile=...)`. A field that is None by default depends on the world size and on
whether symmetric memory works on the machine; `resolve` chooses them all in one place, and the
compiled step (fxtp/decode/decode_graph.py) takes resolved options only. Every value is checked in
`DecodeOptions.__post_init__`, which also runs on the resolved copy, so a default that conflicts with
an explicit choice fails there too.

What each option gained or cost when it was measured: benchmarks/results/decode_step_history.md.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from fxtp.decode.symmetric_memory import symmetric_memory_works
from fxtp.kernels.gemv import block_table
from fxtp.passes.decode.store_gemv_inputs import StoreGemvInputs

POST_GRAD = "post_grad_custom_post_pass"  # inductor's option that `store_gemv_inputs` sets


class InductorOption(NamedTuple):
    field: str  # the DecodeOptions field that sets it
    key: str  # its name among inductor's options
    decode_only: bool  # left out of the prefill's options


INDUCTOR_FIELDS = (InductorOption("coordinate_descent_tuning", "coordinate_descent_tuning", True),
                   InductorOption("pdl", "triton.enable_pdl", True),
                   InductorOption("one_shot_all_reduce", "_collective.auto_select", True))


@dataclass(frozen=True)
class DecodeOptions:
    """A compiled decode step's options; each field says what it does and why it is on or off by
    default. None (a default only) means "chosen by `resolve`"."""

    coordinate_descent_tuning: Optional[bool] = None
    """Inductor's `coordinate_descent_tuning`: inductor tunes the block sizes of the kernels it
    generates (at one row, as gpt-fast does, the matmuls it turns into Triton reductions), each by
    compiling and timing its neighbours one after another. None: on with more than one rank, off with
    one, where fxtp's GEMVs (`gemv`) run every one-row projection and tuning the few kernels left
    cost a cold start more seconds than it saved microseconds a token. The prefill is compiled
    without it: its projections are cuBLAS GEMMs, and tuning its other kernels at a symbolic prompt
    length took most of a cold start."""

    compile_prefill: bool = True
    """The prompt's step (the prefill, any prompt length) is compiled by inductor as well
    (fxtp/decode/prefill_graph.py), once for every cache size. Off, it runs the rank's captured graph
    eagerly: no prefill compilation at start-up, for cuBLAS GEMMs and SDPA launched one by one. On:
    the compiled prefill fuses the norms, rotary embeddings and activations between the GEMMs."""

    pdl: bool = True
    """Programmatic dependent launch (inductor's `triton.enable_pdl`; Hopper and later, ignored on
    older GPUs): each kernel is scheduled while the kernel before it is still finishing and waits for
    it on the GPU, so the launch no longer sits between the two. fxtp's kernels take part and release
    the kernel after them as soon as their own wait is over (fxtp/kernels/dependent_launch.py). On: a
    batch-1 step is hundreds of short kernels, and the gaps between them are a large part of it.
    The prefill, whose kernels are long, is compiled without it."""

    one_shot_all_reduce: Optional[bool] = None
    """Inductor's `_collective.auto_select`: all_reduces up to inductor's
    `_collective.one_shot_all_reduce_threshold_bytes` become symmetric memory's one-shot all_reduce,
    one kernel that reads the peers' buffers over NVLink, in place of NCCL's, whose fixed cost
    dominates a decode step's small messages; larger ones stay NCCL. None: on with more than one rank
    where symmetric memory works (`symmetric_memory_works`); True where it does not is an error."""

    push_all_reduce: Optional[bool] = None
    """The step's all_reduces become `fxtp::push_all_reduce` (fxtp/kernels/push_all_reduce.py): each
    rank writes its part into its peers' symmetric memory and polls its own, one kernel and no
    barrier, where one-shot all_reduce makes the ranks meet twice a call. Parts over its MAX_BYTES go
    to NCCL. None: as `one_shot_all_reduce` resolves, since it needs the same symmetric memory."""

    push_norm: Optional[bool] = None
    """Each push all_reduce followed by the residual add and an RMSNorm also adds and normalizes in
    its kernel (passes/decode/fuse_add_rms_norm.py), so the norm is no kernel of its own. Needs
    `push_all_reduce`; None: as `push_all_reduce`."""

    decode_attention: bool = True
    """The step's `grouped_query_attention` calls (passes/codegen/fold_grouped_query.py) become
    `fxtp::decode_attention` (fxtp/kernels/decode_attention.py): one Triton kernel for a few query
    rows that splits the keys between its programs, where cuDNN's SDPA, made for many query rows,
    keeps few programs busy over a long cache. On: it computes what SDPA does and was at least as
    fast at every batch and cache length measured."""

    merge_projections: bool = True
    """Projections that read the same input (a layer's q, k and v; gate and up) become one, over
    their weights merged into one tensor (passes/decode/merge_projections.py); the rank's other
    programs read views of it, so no weight is held twice. On: at one row q, k and v are small GEMVs
    whose time is more latency than bytes, and one GEMV reads the same bytes in one launch; the
    rotary and gated GEMVs fuse merged projections only."""

    store_gemv_inputs: Optional[bool] = None
    """Inductor's post-grad pass becomes passes/decode/store_gemv_inputs.py: a GEMV's computed input
    (silu(gate) * up, before the down projection) is stored by one small kernel before the GEMV,
    where inductor would recompute it in every program of the GEMV. None: on unless `inductor` names
    its own `post_grad_custom_post_pass`, whose place this takes."""

    gemv: bool = True
    """The step's other one-row projections (`aten.linear`) run on fxtp's GEMV kernel
    (fxtp/kernels/gemv.py) at fixed block sizes, not as inductor's tuned reductions. Inductor tunes
    each GEMV by timing it alone, on each rank apart: the ranks of one step, and two compilations of
    it, then choose different blocks, and every all_reduce waits for the slower rank. On with one
    rank too: fixed kernels need no tuning at start-up (see `coordinate_descent_tuning`)."""

    gemv_prefetch_bytes: int = 0
    """Launched with PDL, each of fxtp's GEMVs (every form: plain, gated, rotary, pushing) asks L2
    for the first this many bytes of its weight while the kernel before it still runs. 0: the
    prefetch shares the GPU with that kernel, a latency-bound one (push all_reduce polling its
    buffers, attention), which it slows about as much as it speeds the GEMV."""

    gated_gemv: bool = True
    """At one row a gated MLP's `act(gate) * up` is computed in its gate|up GEMV
    (passes/decode/fuse_gated_gemv.py; the gated form of fxtp/kernels/gemv.py), so the activation and
    product are no kernel of their own. Llama-style MLPs need `merge_projections` for it. On: it
    removes a latency-bound kernel and its launch a layer and computes what the unfused ops do."""

    rotary_gemv: bool = True
    """At one row a layer's q|k|v projection, the rotary embedding of q and k and the KV-cache write
    of k and v are one kernel (passes/decode/fuse_rotary_gemv.py, fxtp/kernels/rotary_gemv.py), in
    place of the GEMV and three latency-bound kernels; the layers share one cos, sin and write
    position, computed once a step. HF Llama-style attention, with `merge_projections`. On: as
    `gated_gemv`, kernels of a few microseconds each are gone from every layer."""

    gemv_preload: bool = True
    """Launched with PDL, fxtp's GEMVs (every form) load their first weights before they wait for the
    kernel before them, not after, so they stream weights while that kernel finishes. On: those loads
    need nothing from the kernel before, and without PDL there is no wait to load before."""

    gemv_push: bool = False
    """Each projection whose output only a push all_reduce reads (a layer's o and down) becomes one
    op with it (passes/decode/fuse_gemv_push.py, fxtp/kernels/gemv_push.py): fxtp's GEMV writes each
    output into the peers' push buffers as it sums it, and the push kernel after it only polls and
    sums. The projections run on fxtp's GEMV then, whatever `gemv` says. Needs `push_all_reduce`.
    Off: the step ran slower with it than with the GEMV and push apart."""

    gemv_blocks: Mapping[str, Sequence[int]] = field(default_factory=dict, hash=False)
    """Block sizes for fxtp's GEMVs (every form) of the weight shapes it names,
    {"ROWSxCOLUMNS": [BLOCK_N, BLOCK_K, num_warps]} (fxtp/kernels/gemv.py's `block_table`), in place
    of `block_sizes`' choice: for timing block sizes inside the step, where they may rank otherwise
    than alone (benchmarks/gemv_latency.py times them alone). Empty: `block_sizes` chooses."""

    inductor: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Inductor's other options (torch.compile's `options=`), for the decode step and the prefill,
    e.g. {"max_autotune": True}. Those that fields above set (INDUCTOR_FIELDS) are set there."""

    def __post_init__(self):
        for option in dataclasses.fields(self):
            value, chosen = getattr(self, option.name), option.default is None
            if (isinstance(option.default, bool) or chosen) and not (type(value) is bool or chosen and value is None):
                raise ValueError(f"DecodeOptions.{option.name} is True or False"
                                 f"{' (or None, chosen by resolve)' if chosen else ''}, got {value!r}")
        if type(self.gemv_prefetch_bytes) is not int or self.gemv_prefetch_bytes < 0:
            raise ValueError(f"DecodeOptions.gemv_prefetch_bytes is the bytes of each weight that fxtp's GEMVs "
                             f"prefetch into L2, 0 or more, got {self.gemv_prefetch_bytes!r}")
        block_table(self.gemv_blocks)  # raises on a malformed table
        if not isinstance(self.inductor, Mapping) or not all(isinstance(key, str) for key in self.inductor):
            raise ValueError(f"DecodeOptions.inductor is a dict of inductor's options by name, got {self.inductor!r}")
        object.__setattr__(self, "gemv_blocks", dict(self.gemv_blocks))  # the caller's dicts may change later
        object.__setattr__(self, "inductor", dict(self.inductor))
        for owned in INDUCTOR_FIELDS:
            if owned.key in self.inductor:
                raise ValueError(f"DecodeOptions.inductor names {owned.key!r}, which the field {owned.field} sets: "
                                 f"pass {owned.field}={self.inductor[owned.key]!r} instead")
        if self.store_gemv_inputs and POST_GRAD in self.inductor:
            raise ValueError(f"store_gemv_inputs=True is inductor's {POST_GRAD}, which `inductor` sets already; "
                             f"leave store_gemv_inputs out (it is then off) or drop {POST_GRAD} from `inductor`")
        for name, fused in (("push_norm", "the norm"), ("gemv_push", "the projection before it")):
            if getattr(self, name) and self.push_all_reduce is False:
                raise ValueError(f"{name}=True fuses {fused} into push all_reduce, which is off here "
                                 f"(push_all_reduce=False; by default it is on only with more than one rank where "
                                 f"symmetric memory works): turn push_all_reduce on or leave {name} out")

    def unresolved(self) -> list[str]:
        """The fields still None, which `resolve` chooses."""
        return [option.name for option in dataclasses.fields(self) if getattr(self, option.name) is None]

    def inductor_options(self, decode: bool = True) -> dict:
        """torch.compile's `options=` for the decode step (resolved options only), or with
        `decode=False` for the prefill, which leaves out coordinate descent tuning, PDL, one-shot all_reduce (a prefill's
        all_reduces are over the whole prompt, above its threshold, and of symbolic sizes) and the
        post-grad pass (a prefill's projections are no GEMVs)."""
        if decode and self.unresolved():
            raise ValueError(f"the decode step's options {', '.join(self.unresolved())} are None: choose them with "
                             f"fxtp.decode.options.resolve(options, world_size, symmetric_memory)")
        options = {owned.key: getattr(self, owned.field) for owned in INDUCTOR_FIELDS if decode or not owned.decode_only}
        if decode and self.store_gemv_inputs:
            options[POST_GRAD] = StoreGemvInputs()
        return {**options, **self.inductor}


def resolve(options: DecodeOptions, world_size: int, symmetric_memory: bool) -> DecodeOptions:
    """`options` with every field that is None chosen for `world_size` ranks, `symmetric_memory`
    saying whether it works between them (`symmetric_memory_works`). Symmetric-memory all_reduces
    asked for where it does not work are a RuntimeError."""
    several = world_size > 1
    for name in ("one_shot_all_reduce", "push_all_reduce"):
        if getattr(options, name) and several and not symmetric_memory:
            raise RuntimeError(f"{name}=True needs symmetric memory, which does not work between these ranks "
                               f"(symmetric_memory_works warned why); leave {name} out to use NCCL")
    one_shot = several and symmetric_memory if options.one_shot_all_reduce is None else options.one_shot_all_reduce
    push = one_shot if options.push_all_reduce is None else options.push_all_reduce
    chosen = {"coordinate_descent_tuning": several, "one_shot_all_reduce": one_shot, "push_all_reduce": push,
              "push_norm": push, "store_gemv_inputs": POST_GRAD not in options.inductor}
    return dataclasses.replace(options, **{name: value if getattr(options, name) is None else getattr(options, name)
                                           for name, value in chosen.items()})


def requested(compile: Union[bool, dict, DecodeOptions]) -> DecodeOptions:
    """The DecodeOptions that `compile=` asks for: True (the defaults), a dict of fields, or one."""
    if isinstance(compile, DecodeOptions):
        return compile
    if compile is True:
        return DecodeOptions()
    if not isinstance(compile, dict):
        raise TypeError(f"compile is True, False, an fxtp.DecodeOptions or a dict of its fields (e.g. "
                        f"{{'gemv': False}}), got {compile!r}")
    names = [option.name for option in dataclasses.fields(DecodeOptions)]
    for key in compile:
        if key not in names:
            raise TypeError(f"compile={{{key!r}: ...}}: DecodeOptions has no field {key!r}; {unknown_key_hint(key, names)}. "
                            f"Its fields: {', '.join(names)}")
    return DecodeOptions(**compile)


def unknown_key_hint(key, names: list[str]) -> str:
    """What a user who passed `key` among `compile`'s fields most likely meant."""
    owner = next((owned.field for owned in INDUCTOR_FIELDS if owned.key == key), None)
    if owner is not None:
        return f"it is the inductor option that the field {owner!r} sets"
    import torch._inductor.config as inductor_config

    if key in inductor_config.get_config_copy():
        return f"it is an inductor option: pass inductor={{{key!r}: ...}}"
    # "fxtp.gemv" was the key of `gemv` before options were typed: its last part is the field's name
    closest = difflib.get_close_matches(str(key).rpartition(".")[2], names, n=1, cutoff=0.0)
    return f"the closest field is {closest[0]!r}"


def decode_options(compile: Union[bool, dict, DecodeOptions], group_name: str, world_size: int,
                   device: torch.device) -> DecodeOptions:
    """The resolved options of a rank's decode step on `device` for `compile=`; with more than one
    rank a collective (the symmetric-memory probe), so every rank calls it at the same point."""
    options = requested(compile)
    if device.type != "cuda":
        raise ValueError(f"compile=True captures the decode step as a CUDA graph, but the device is {device}: "
                         "pass a CUDA device, or compile=False on the CPU")
    return resolve(options, world_size, world_size > 1 and symmetric_memory_works(group_name, device))
