"""`fxtp.compile` and the program it returns: the annotated graph, its plan and the per-rank modules."""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections import OrderedDict
from dataclasses import replace
from functools import cached_property
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import torch.fx as fx

from fxtp.progress import stage
from fxtp.sharding import collectives
from fxtp.capture.export import Captured, capture, model_device
from fxtp.capture.plain_module import ExampleInputs, attention_heads, capture_plain, is_hf_model
from fxtp.node_meta import STATE
from fxtp.decode.options import DecodeOptions
from fxtp.rank_ops.inputs import exact_device, require_tensor
from fxtp.runtime.dtensor_module import DTensorRankModule
from fxtp.runtime.whole_state import state_layouts
from fxtp.runtime import step_cache
from fxtp.runtime.rank_state import readable_from_model, state_loader
from fxtp.runtime.step_cache import saved_rank_graph
from fxtp.runtime.rank_guard import guard_rank_module
from fxtp.passes.sharding.manual_plan import manual_plan
from fxtp.runtime.compile_arguments import checked_spec
from fxtp.passes.sharding.plan import Plan, plan as auto_plan
from fxtp.passes.capture.clean_up import clean_up
from fxtp.passes.codegen.rank_graph import rank_graph
from fxtp.runtime.simulate import simulate as run_lockstep
from fxtp.sharding.op_rules.on_rank import no_values_on_one_rank
from fxtp.runtime.generation import Generator, collecting_sources, forget_sources
from fxtp.capture.seq2seq_cache import capture_decoder, capture_encoder
from fxtp.capture.signatures import SEQ2SEQ, signature_of
from fxtp.capture.static_cache import capture_cached, sized_cache_state
from fxtp.capture.training import capture_training, leave_logits_sharded

__all__ = ["compile", "TPProgram"]

# step programs kept per (batch size, cache length), least recently used dropped first: a causal LM's
# share one graph and plan; an encoder-decoder's decoder step is a graph and plan of its own
PROGRAMS_PER_SHAPE = 32


def compile(model: torch.nn.Module, world_size: int, *, plan="auto", tp_plan=None,
            injection_policy: Optional[dict] = None, example_inputs: Optional[ExampleInputs] = None,
            dynamic_shapes=None, training: bool = False, capture_on_first_use: bool = False) -> "TPProgram":
    """Capture `model`, plan its sharding over `world_size` ranks and return the program.
    `plan` is "auto" or {module pattern: "colwise" | "rowwise" | "replicate"}; an HF `tp_plan`
    (dict or "auto") or a DeepSpeed `injection_policy` may be given instead (passes/sharding/manual_plan.py).
    A plain nn.Module (no HF config) is captured from `example_inputs`, the tensors its forward takes
    positionally, with dims 0 and 1 of its token ids (2-D integer inputs) dynamic unless `dynamic_shapes`
    (torch.export's form) says otherwise (fxtp/capture/plain_module.py); a HF model needs neither.
    With `training`, a HF causal LM is captured in train mode as (input_ids, attention_mask, labels) ->
    (loss, logits) (fxtp/capture/training.py), and its rank modules hold trainable shards: each rank's
    backward leaves in every parameter's .grad its part of the unsharded model's gradient.
    With `capture_on_first_use` (a HF model, not for training), the arguments are checked now and the
    forward is captured and planned when something first reads its graph (simulate, module, dump):
    a program that only generates never exports it (`compile_on_first_use`)."""
    if type(capture_on_first_use) is not bool:
        raise TypeError(f"capture_on_first_use is True or False, got {capture_on_first_use!r}")
    if capture_on_first_use:
        if training or not is_hf_model(model):
            raise ValueError("capture_on_first_use=True defers the capture of a HF model's forward for inference; "
                             f"{'training' if training else 'a plain module (its example_inputs)'} is captured now: "
                             "leave capture_on_first_use out")
        return compile_on_first_use(model, world_size, plan=plan, tp_plan=tp_plan, injection_policy=injection_policy)
    spec = checked_spec(model, world_size, plan, tp_plan, injection_policy, example_inputs, dynamic_shapes, training)
    hf = is_hf_model(model)
    sources: set[str] = set()
    with collecting_sources(sources):
        captured = capture_training(model) if training else capture(model) if hf else \
            capture_plain(model, example_inputs, dynamic_shapes)
        heads = None if hf else attention_heads(captured.graph_module)
        if heads is not None and world_size > heads:
            raise ValueError(f"world_size={world_size} is larger than the {heads} attention heads fxtp finds in "
                             f"{type(model).__name__}'s graph (its scaled_dot_product_attention queries); fxtp never "
                             f"splits inside a head, so use world_size <= {heads}")
        program = TPProgram(captured, world_size, spec, model, training)
    program.sources.update(sources)
    if os.environ.get("FXTP_DEBUG", "0") != "0":
        for group in program.plan.groups:
            reason = f": {group.reason.splitlines()[0]}" if group.reason else ""
            print(f"fxtp: {group.role:15s} {', '.join(group.weights)}{reason}", file=sys.stderr)
    return program


def compile_on_first_use(model: torch.nn.Module, world_size: int, *, plan="auto", tp_plan=None,
                         injection_policy: Optional[dict] = None) -> "TPProgram":
    """fxtp.compile's program of a HF model, checked now, whose forward is captured and planned when
    something first reads its graph (simulate, module, dump, a forward without a KV cache). Generation
    captures step programs of its own, so a model that only generates (fxtp.parallelize's) never
    exports the cacheless forward, which for a 32-layer model takes seconds of every start."""
    spec = checked_spec(model, world_size, plan, tp_plan, injection_policy, None, None, False)
    return TPProgram(lambda: capture(model), world_size, spec, model)


class TPProgram:
    """A model sharded over `world_size` ranks: its global graph annotated with layouts, and its plan."""

    def __init__(self, captured: Union[Captured, Callable[[], Captured], None], world_size: int, spec, model: torch.nn.Module,
                 training: bool = False, planned: Optional[Callable[[], tuple[Captured, Plan]]] = None,
                 step_size: Optional[tuple[int, int]] = None):
        """`captured`, or what captures it when the graph is first read; `spec`: "auto" or fxtp's manual
        form {module pattern: colwise/rowwise/replicate}; `training`: the capture is fxtp.capture.training's,
        and rank graphs are differentiable; `planned`: what gives the capture and its plan, made by another
        program (`captured` is then None);
        `step_size`: (batch, length) of the static cache of a causal LM's step, whose rank graphs are
        kept in the step cache (fxtp/runtime/step_cache.py)."""
        self.world_size = world_size
        self.spec = spec
        self.training = training
        self.step_size = step_size
        self.model = model  # on meta when loading from a checkpoint: it holds no weights then
        self.config = getattr(model, "config", None) if is_hf_model(model) else None  # None: a plain nn.Module
        self._simulated: dict[tuple[str, Optional[str]], list[fx.GraphModule]] = {}
        self._with_cache: OrderedDict[tuple[int, int], TPProgram] = OrderedDict()  # least recently used first
        self._generators: dict[str, Generator] = {}
        self._encoder: Optional[TPProgram] = None
        # torch.fx keeps every GraphModule's generated source in a global cache for tracebacks and never
        # evicts it; the sources made for this program (its capture, clean-ups, rank graphs) go with it
        self.sources: set[str] = set()
        weakref.finalize(self, forget_sources, self.sources)
        self._capture = captured if callable(captured) else lambda: captured
        self._planned_elsewhere = planned
        if planned is None and not callable(captured):
            self._planned  # plans now: a plan that fails fails fxtp.compile

    @cached_property
    def _planned(self) -> tuple[Captured, Plan]:
        """The capture, cleaned up, with its graph annotated by the plan."""
        if self._planned_elsewhere is not None:
            return self._planned_elsewhere()
        with collecting_sources(self.sources):
            captured = self._capture()
            with stage(f"plan over {self.world_size} ranks"), \
                    no_values_on_one_rank() if self.training else contextlib.nullcontext():
                captured = clean_up(captured)
                graph = captured.graph_module
                plan = auto_plan(graph, self.world_size) if self.spec == "auto" else \
                    manual_plan(graph, self.world_size, self.spec)
                if self.training:
                    leave_logits_sharded(graph, plan.groups)
        return captured, plan

    @property
    def captured(self) -> Captured:
        return self._planned[0]

    @property
    def graph(self) -> fx.GraphModule:
        """The global graph annotated with layouts."""
        return self._planned[0].graph_module

    @property
    def plan(self) -> Plan:
        return self._planned[1]

    @property
    def device(self) -> torch.device:
        """The model's device (as the capture's), known without capturing."""
        return model_device(self.model)

    @property
    def model_type(self) -> str:
        """The HF model type ("llama"), or a plain module's class name."""
        return self.config.model_type if self.config is not None else type(self.model).__name__

    def require_hf_model(self, feature: str) -> None:
        """A TypeError where `feature` needs what only a HF model has (a config, its KV-cache layout,
        a generation config, HF checkpoint names) and this program is of a plain nn.Module."""
        if self.config is None:
            raise TypeError(f"{feature} needs a HF model (its config, KV cache, generation config and checkpoint "
                            f"names); {self.model_type} is a plain nn.Module, compiled for its forward only: run it "
                            "with tp.simulate(*inputs) or tp.module(rank), with the weights the module holds")

    def require_inference(self, feature: str) -> None:
        """A TypeError where `feature` (KV caches, generation) is inference and the program is for training."""
        self.require_hf_model(feature)
        if self.training:
            raise TypeError(f"{feature} is for inference, and this program was compiled with training=True (its graph "
                            "takes labels and returns (loss, logits)): compile the model again without training=True "
                            "to generate, after copying the trained weights back (see the README's Training section)")

    def with_cache(self, batch_size: int, max_length: int) -> "TPProgram":
        """The program of one generation step with a static KV cache of `batch_size` sequences of
        up to `max_length` tokens, planned the same way as this one. A causal LM's first size is
        captured at that size, which exports fastest; from the second on, its step is captured and
        planned once for every size (fxtp/capture/static_cache.py), and this program is it with its
        cache at this size. An encoder-decoder's decoder step (fxtp/capture/seq2seq_cache.py) is
        captured per size."""
        self.require_inference("with_cache")
        key = (batch_size, max_length)
        if key not in self._with_cache:
            if self.is_seq2seq:
                sources: set[str] = set()
                with collecting_sources(sources):
                    program = TPProgram(capture_decoder(self.model, batch_size, max_length), self.world_size,
                                        self.spec, self.model)
                program.sources.update(sources)
            elif not self._with_cache and "_cached_step" not in self.__dict__:  # the first size
                program = TPProgram(lambda: capture_cached(self.model, key), self.world_size, self.spec, self.model,
                                    step_size=key)
            else:
                def sized() -> tuple[Captured, Plan]:  # the symbolic step, captured and planned when first read
                    step = self._cached_step
                    return replace(step.captured, state=sized_cache_state(step.captured.state, *key)), step.plan
                program = TPProgram(None, self.world_size, self.spec, self.model, planned=sized, step_size=key)
            self._with_cache[key] = program
            while len(self._with_cache) > PROGRAMS_PER_SHAPE:
                self._with_cache.popitem(last=False)
        self._with_cache.move_to_end(key)
        return self._with_cache[key]

    @cached_property
    def _cached_step(self) -> "TPProgram":
        """The causal LM's step with a static KV cache of symbolic size, captured and planned when first used."""
        return TPProgram(lambda: capture_cached(self.model), self.world_size, self.spec, self.model)

    @property
    def is_seq2seq(self) -> bool:
        return self.config is not None and signature_of(self.model).kind == SEQ2SEQ

    def encoder(self) -> "TPProgram":
        """An encoder-decoder model's encoder, (input_ids, attention_mask) -> last_hidden_state,
        planned the same way as this program: generation runs it once per request."""
        self.require_inference("encoder")
        if self._encoder is None:
            sources: set[str] = set()
            with collecting_sources(sources):
                self._encoder = TPProgram(capture_encoder(self.model), self.world_size, self.spec, self.model)
            self._encoder.sources.update(sources)
        return self._encoder

    def generator(self, rank: Optional[int] = None, device=None, process_group: Optional[dist.ProcessGroup] = None,
                  checkpoint: Optional[str] = None, compile: Union[bool, dict, DecodeOptions] = False) -> "Generator":
        """Generation on `rank` in this process (under torchrun; see `module` for the arguments), or
        on every rank in this process when `rank` is None. `compile` (True, or the decode step's
        options, `fxtp.DecodeOptions` or a dict of its fields: fxtp/decode/options.py) runs decode steps compiled and
        captured as a CUDA graph (one rank per process, on CUDA)."""
        self.require_inference("generation")
        device = exact_device(device) if device is not None else self._default_device()
        if rank is None:
            if compile is not False:
                raise ValueError("compile=True needs one rank per process: pass rank=dist.get_rank() under torchrun")
            return Generator(self, list(range(self.world_size)), collectives.SIMULATED_GROUP, device, checkpoint)
        return Generator(self, [rank], self._group_name(rank, device, process_group), device, checkpoint, compile)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Tokens generated by the sharded program, every rank run in this process (see Generator.generate)."""
        self.require_inference("generate")
        require_tensor("input_ids", input_ids)
        key = str(input_ids.device)
        if key not in self._generators:
            self._generators[key] = self.generator(device=input_ids.device)
        return self._generators[key].generate(input_ids, attention_mask, **kwargs)

    def rank_graph(self, rank: int, group_name: str = collectives.SIMULATED_GROUP,
                   device: Optional[torch.device] = None, checkpoint: Optional[str] = None,
                   shared: Optional[dict] = None) -> fx.GraphModule:
        """The rank's GraphModule without checks on the process group (for inspection and simulate).
        With `checkpoint` (a HF safetensors directory or file) only this rank's slices are read from it.
        `shared` maps (state name, layout) to tensors this rank already holds; they are reused
        and new ones added, so the programs of one rank share their weights."""
        self.check_rank(rank)
        if checkpoint is not None:
            self.require_hf_model("checkpoint= (loading slices by HF state names)")
        device = exact_device(device) if device is not None else self.device
        if checkpoint is None and self.device.type == "meta":
            raise ValueError("the model is on the meta device, so it has no weights to shard: pass "
                             "checkpoint=<HF safetensors directory> (and device=...) to load this rank's slices")
        if device.type == "meta":
            raise ValueError("device='meta' holds no data: pass device='cpu' or f'cuda:{local_rank}'")
        key = self._step_key(rank, group_name, device)
        saved = step_cache.read(key) if key is not None else None
        graph = saved.graph() if saved is not None else None
        captured = self.captured if graph is None else None  # captured and planned first, stages of their own
        source = f"from {checkpoint}" if checkpoint is not None else "from the model"
        made = " (from the step cache)" if graph is not None else ""
        with stage(f"rank {rank}'s graph{made} and weights ({source}, on {device})"), collecting_sources(self.sources):
            if graph is not None:  # made by an earlier process: no export or plan, and only the weights to read
                load = state_loader(saved.state_meta(), rank, device, model=self.model, aliases=saved.aliases,
                                    checkpoint=checkpoint, shared=shared, from_model=checkpoint is None)
                return saved.module(graph, load)
            load = state_loader(captured.state, rank, device, model=self.model, aliases=captured.aliases,
                                constants=captured.constants, checkpoint=checkpoint, shared=shared,
                                training=self.training)
            module = rank_graph(self.graph, captured.state, rank, self.world_size, group_name, device, load,
                                self.training)
        if key is not None and readable_from_model(self.model, captured.state.keys() - captured.constants):
            step_cache.write(key, lambda: saved_rank_graph(module, captured.state, captured.aliases, captured.constants))
        return module

    def _step_key(self, rank: int, group_name: str, device: torch.device) -> Optional[str]:
        """The step cache's key of this rank's graph (fxtp/runtime/step_cache.py), for a causal LM's step
        with a static cache of one size (`step_size`); None for other programs, and where the cache is off."""
        if self.step_size is None or self.training or step_cache.cache_directory() is None:
            return None  # the key hashes the model's code and state: not done where nothing is kept
        return step_cache.step_key(self.model, self.spec, self.world_size, rank, group_name, device, self.step_size)

    def module(self, rank: int, device=None, process_group: Optional[dist.ProcessGroup] = None,
               checkpoint: Optional[str] = None) -> fx.GraphModule:
        """This rank's GraphModule (only its shards) calling collectives on `process_group`
        (default: the default group, which must have `world_size` ranks). With `checkpoint`, its
        slices are read from that HF safetensors checkpoint (the model may be on meta).
        With several ranks each call first checks that every rank was given the same inputs
        (fxtp/runtime/rank_agreement.py), and a call that raises tears the group down so that the
        peers fail at once, naming this rank (fxtp/runtime/fail_fast.py)."""
        device = exact_device(device) if device is not None else self._default_device()
        group_name = self._group_name(rank, device, process_group)
        module = self.rank_graph(rank, group_name, device, checkpoint)
        if self.world_size > 1:
            guard_rank_module(module, group_name, rank)
        return module

    def dtensor_module(self, mesh: "DeviceMesh", checkpoint: Optional[str] = None) -> DTensorRankModule:
        """This rank's training module with DTensor parameters on `mesh`: a 1-D DeviceMesh of world_size ranks,
        or the tensor-parallel dim of a larger one (mesh["tp"]). clip_grad_norm_, torch.distributed.checkpoint
        and optimizers then see global tensors (fxtp/runtime/dtensor_module.py)."""
        if not self.training:
            raise TypeError("dtensor_module holds trainable shards: compile with fxtp.compile(model, N, training=True)")
        device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" \
            else torch.device(mesh.device_type)
        module = self.module(mesh.get_local_rank(), device, mesh.get_group(), checkpoint)
        return DTensorRankModule(module, state_layouts(self.graph), mesh)

    def _default_device(self) -> torch.device:
        return torch.device("cpu") if self.device.type == "meta" else self.device

    def _group_name(self, rank: int, device: torch.device, process_group: Optional[dist.ProcessGroup]) -> str:
        """The name of the group the rank's collectives run on, after checking it fits the program."""
        self.check_rank(rank)
        if self.world_size == 1:
            return collectives.SIMULATED_GROUP  # no collectives are emitted
        if process_group is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"tp.module({rank}) runs collectives, but torch.distributed is not initialized: launch "
                    f"{self.world_size} processes (torchrun --nproc_per_node {self.world_size} ...) and call "
                    "dist.init_process_group() first, pass process_group=..., or use tp.simulate(...) in one process")
            process_group = dist.group.WORLD
        size, own = dist.get_world_size(process_group), dist.get_rank(process_group)
        if size != self.world_size:
            raise RuntimeError(f"the process group has {size} ranks but the program was compiled for "
                               f"world_size={self.world_size}: compile with fxtp.compile(model, {size}), or pass "
                               f"process_group= a group of {self.world_size} ranks")
        if own != rank:
            raise RuntimeError(f"tp.module({rank}) called on the process of rank {own}: use tp.module(dist.get_rank())")
        if dist.get_backend(process_group) == "nccl" and device.type != "cuda":
            raise RuntimeError(f"the process group uses NCCL, which needs CUDA tensors, but device={device}: "
                               f"pass device=f'cuda:{{local_rank}}'")
        return process_group.group_name

    def simulate_ranks(self, *args: Optional[torch.Tensor], checkpoint: Optional[str] = None,
                       **inputs: Optional[torch.Tensor]) -> list:
        """Every rank's output, all ranks run in this process with exact collectives. `args` are the
        graph's inputs in order (a HF model's input_ids, attention_mask; a plain module's positional
        inputs), `inputs` the others by name (decoder_input_ids=..., token_type_ids=...). With
        `checkpoint` (a HF safetensors directory or file; needed when the model is on meta) each
        rank's slices are read from it."""
        names = [n.name for n in self.graph.graph.nodes if n.op == "placeholder" and STATE not in n.meta]
        if len(args) > len(names):
            raise TypeError(f"{len(args)} inputs given, but this {self.model_type} program takes {len(names)}: {names}")
        unknown = sorted(set(inputs) - set(names[len(args):]))
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}: this {self.model_type} program takes {names}")
        values = {**dict(zip(names, args)), **inputs}
        require_tensor(names[0], values.get(names[0]))
        modules = self.lockstep_modules(values[names[0]].device, checkpoint)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return run_lockstep(modules, (), values)

    def lockstep_modules(self, device=None, checkpoint: Optional[str] = None) -> list[fx.GraphModule]:
        """Every rank's module on `device`, the ones simulate_ranks runs (made once per device and
        checkpoint). In a program for training they hold each rank's trainable shards: after
        `torch.autograd.backward([loss of each rank])` their .grad are what each rank's process gets."""
        device = exact_device(device) if device is not None else self._default_device()
        key = (str(device), checkpoint)
        if key not in self._simulated:
            self._simulated[key] = [self.rank_graph(r, device=device, checkpoint=checkpoint)
                                    for r in range(self.world_size)]
        return self._simulated[key]

    def simulate(self, *args: Optional[torch.Tensor], checkpoint: Optional[str] = None,
                 **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """The sharded program's output (logits, or an encoder's hidden states), computed in one
        process; equals the unsharded model's. `args`, `inputs`, `checkpoint`: see simulate_ranks."""
        return self.simulate_ranks(*args, checkpoint=checkpoint, **inputs)[0]

    def check_rank(self, rank: int) -> None:
        """A ValueError unless `rank` is one of the program's ranks."""
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")
