"""Rank graphs of a causal LM's generation step kept on disk, so that a new process skips export and planning.

Every process that generates exports the model's step with a static KV cache and plans it before its
first token: about 8 s of a Llama-3-8B start, the same work each time for the same model. The result
of that work, each rank's graph, depends only on what the key below names, so it is saved once and
read back by later processes, as inductor's FX graph cache does for inductor's own work. A saved
rank graph holds its nodes and, for each state attribute, the state's name and layout: never a
weight, which is read from the checkpoint or the model as before, so the cache cannot go stale when
weights change.

The key (`step_key`) covers what the graph is made from: fxtp's own source, torch's and
transformers' versions, the code the model runs (patched or not), its config (and its attention and
experts implementations), the names, shapes and dtypes of its state, the plan's spec, the world
size and rank, the process group's name, the device and the cache's size.

FXTP_CACHE_DIR names the directory (default: $XDG_CACHE_HOME/fxtp, else ~/.cache/fxtp); an empty
value turns the cache off. Its files are pickles, as inductor's are: the directory must be one only its
user writes. A file that cannot be read is logged, ignored and written anew; a graph with a node the
cache cannot name (a function it cannot import back) is not saved.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import pickle
import sys
import tempfile
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
import transformers

from fxtp.node_meta import COLLECTIVE, LAYOUT
from fxtp.passes.codegen.rewrite import set_state

FORMAT = 2  # bumped when SavedRankGraph changes: files of another format are not read
LOGGER = logging.getLogger("fxtp")
KEPT_META = (LAYOUT, COLLECTIVE)  # what the dump and the decode passes may read of a rank graph's nodes


def cache_directory() -> Optional[Path]:
    """Where rank graphs are kept, or None where FXTP_CACHE_DIR is set empty (off)."""
    named = os.environ.get("FXTP_CACHE_DIR")
    if named is not None:
        return Path(named) if named.strip() else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxtp"


@cache
def source_digest() -> str:
    """A digest of fxtp's Python source (the package and its passes): a changed pass makes other graphs."""
    # the folders holding this module's package and the passes' (installed as fxtp.passes, found apart
    # in an editable install)
    roots = {Path(__file__).resolve().parents[1], Path(inspect.getfile(set_state)).resolve().parents[1]}
    digest = hashlib.sha256()
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def model_code_digest(model: torch.nn.Module) -> str:
    """A digest of the code the model runs: every method of its modules' classes (their bases too, but
    torch's) and every function in the namespaces defining them, as compiled now. A class or function patched at
    run time (a fused-kernel library's patch of a HF model, a model's own remote code) changes it; the
    bytecode, not addresses, is hashed, so it is the same in every process running the same code."""
    digest = hashlib.sha256()
    # torch's own classes are torch's version; transformers gives nn.Module a method when it first
    # initializes weights (smart_apply), which would make processes that did and did not differ
    classes = {klass for module in model.modules() for klass in type(module).__mro__
               if klass is not object and not klass.__module__.startswith("torch.")}
    for klass in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        digest.update(f"class {klass.__module__}.{klass.__qualname__}".encode())
        _functions_digest(vars(klass), digest)
    for name in sorted({klass.__module__ for klass in classes}):
        digest.update(f"module {name}".encode())
        _functions_digest(vars(sys.modules[name]) if name in sys.modules else {}, digest)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # what config._attn_implementation picks

    _functions_digest(dict(ALL_ATTENTION_FUNCTIONS.items()), digest)
    return digest.hexdigest()


def _functions_digest(namespace: dict, digest) -> None:
    for name in sorted(namespace, key=str):
        function = namespace[name]
        function = getattr(function, "__func__", function)  # a staticmethod's or classmethod's function
        code = getattr(function, "__code__", None)
        if isinstance(code, types.CodeType):
            digest.update(str(name).encode())
            _code_digest(code, digest)


def _code_digest(code: types.CodeType, digest) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            _code_digest(constant, digest)
        elif isinstance(constant, frozenset):  # iteration order differs between processes
            digest.update(repr(sorted(map(repr, constant))).encode())
        else:
            digest.update(repr(constant).encode())


# what save_pretrained and from_pretrained write into a config about where it came from: no graph reads it
PROVENANCE = ("architectures", "_name_or_path", "transformers_version", "_commit_hash")


def _config_fields(config) -> str:
    """The config's fields as JSON, less PROVENANCE: the same model saved once (which sets its
    `architectures`) and the same model not saved are one key."""
    fields = json.loads(config.to_json_string(use_diff=False))
    for key in PROVENANCE:
        fields.pop(key, None)
    return json.dumps(fields, sort_keys=True)


def _implementations(config) -> list:
    """The config's private choices of implementation (attention, experts), which its JSON leaves out."""
    configs = [config, config.get_text_config(decoder=True)]
    return [(key, repr(value)) for c in configs for key, value in sorted(vars(c).items())
            if key.startswith("_") and "_implementation" in key]


def step_key(model: torch.nn.Module, spec, world_size: int, rank: int, group_name: str, device: torch.device,
             size: tuple[int, int]) -> str:
    """The key of a rank graph of `model`'s step with a static cache of `size` (batch, length)."""
    config = model.config
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    parts = [
        FORMAT, source_digest(), torch.__version__, transformers.__version__, model_code_digest(model),
        type(model).__qualname__, _config_fields(config), _implementations(config),
        [(name, tuple(t.shape), str(t.dtype), isinstance(t, torch.nn.Parameter), t.device.type) for name, t in tensors],
        repr(spec), world_size, rank, group_name, str(device), tuple(size),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class _Uncacheable(Exception):
    """A graph the cache cannot save (a call it cannot name, state it cannot describe)."""


@dataclass(frozen=True)
class _Ref:
    """A node argument that is another node, by name (no tuple: fx maps over tuples' items)."""
    name: str


class StateEntry(NamedTuple):
    """What a rank graph's loader reads of a state tensor: its full shape and dtype, and whether it is a
    parameter (a rank holds a Parameter for it) or a buffer."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_parameter: bool

    def meta(self) -> torch.Tensor:
        empty = torch.empty(self.shape, dtype=self.dtype, device="meta")
        return torch.nn.Parameter(empty, requires_grad=False) if self.is_parameter else empty


@dataclass
class SavedRankGraph:
    """A rank graph without its weights: `nodes` (op, name, target, args, kwargs, meta) with node
    arguments as _Ref; `state` the StateEntry of every state tensor of the capture; `attributes` the
    layout of each state attribute (named by its state name); `stored` the values of attributes that
    are no model weight (export's lifted constants); `aliases` the tied weights' other names."""
    format: int
    class_name: str
    nodes: list[tuple]
    state: dict[str, StateEntry]
    attributes: dict[str, Any]
    stored: dict[str, torch.Tensor]
    aliases: dict[str, list[str]]

    def state_meta(self) -> dict[str, torch.Tensor]:
        """The state as meta tensors, as a capture of a model on meta holds it."""
        return {name: entry.meta() for name, entry in self.state.items()}

    def graph(self) -> Optional[fx.Graph]:
        """The rank graph's nodes again, or None (logged) where they do not come back: a function
        that no longer imports, an operator this torch lacks."""
        graph = fx.Graph()
        made: dict[str, fx.Node] = {}
        try:
            for op, name, target, args, kwargs, meta in self.nodes:
                args, kwargs = (_nodes_back(x, made) for x in (args, kwargs))
                node = graph.create_node(op, _target_back(target), args, kwargs, name=name)
                node.meta.update(meta)
                made[name] = node
            graph.lint()
        except Exception as error:
            LOGGER.warning("a step cache file's graph could not be made again (%s: %s); exporting the step again",
                           type(error).__name__, error)
            return None
        return graph

    def module(self, graph: fx.Graph, load: Callable[[str, Any], torch.Tensor]) -> fx.GraphModule:
        """The rank graph of `graph` (from `graph()`), each state attribute `load(state name, layout)`."""
        root = torch.nn.Module()
        for name, layout in self.attributes.items():
            set_state(root, name, load(name, layout))
        for name, value in self.stored.items():
            set_state(root, name, value)
        module = fx.GraphModule(root, graph, class_name=self.class_name)
        module.eval()
        return module


def saved_rank_graph(module: fx.GraphModule, state: dict[str, torch.Tensor], aliases: dict[str, list[str]],
                     constants: frozenset) -> SavedRankGraph:
    """What `SavedRankGraph.module` needs to make `module` (a rank graph of a capture with `state`) again.
    Raises _Uncacheable for a graph it cannot describe."""
    attributes, stored = {}, {}
    held = dict([*module.named_parameters(), *module.named_buffers()])
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target in state and node.target not in constants:
            attributes[node.target] = node.meta.get(LAYOUT)
            continue
        value = held.get(node.target)
        if value is None or value.device.type == "meta":
            raise _Uncacheable(f"attribute {node.target} is no state tensor with a value")
        stored[node.target] = value.detach().cpu()
    nodes = [(node.op, node.name, _target_ref(node), _node_refs(node.args), _node_refs(node.kwargs),
              {key: node.meta[key] for key in KEPT_META if key in node.meta}) for node in module.graph.nodes]
    entries = {name: StateEntry(tuple(t.shape), t.dtype, isinstance(t, torch.nn.Parameter)) for name, t in state.items()}
    return SavedRankGraph(FORMAT, type(module).__name__, nodes, entries, attributes, stored, aliases)


def read(key: str) -> Optional[SavedRankGraph]:
    """The rank graph saved under `key`, or None (none saved, the cache off, or a file that cannot be read)."""
    directory = cache_directory()
    if directory is None:
        return None
    path = directory / f"{key}.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if not isinstance(saved, SavedRankGraph) or saved.format != FORMAT:
            raise ValueError("not a rank graph of this fxtp's format")
        return saved
    except Exception as error:  # a truncated or foreign file: made again, and written anew
        LOGGER.warning("step cache file %s could not be read (%s: %s); exporting the step again",
                       path, type(error).__name__, error)
        return None


def write(key: str, saved_from: Callable[[], SavedRankGraph]) -> None:
    """Save `saved_from()` under `key` (atomically: a reader never sees a partial file). A graph the
    cache cannot describe, or a directory it cannot write, is logged and skipped."""
    directory = cache_directory()
    if directory is None:
        return
    try:
        saved = saved_from()
        data = pickle.dumps(saved, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)  # a target or argument that does not come back is found now, not in the next process
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
            f.write(data)
        os.replace(f.name, directory / f"{key}.pkl")
    except (_Uncacheable, OSError, pickle.PicklingError, AttributeError, TypeError) as error:
        LOGGER.debug("step cache: rank graph not saved (%s: %s)", type(error).__name__, error)


def _node_refs(value):
    return fx.node.map_aggregate(value, lambda x: _Ref(x.name) if isinstance(x, fx.Node) else _plain(x))


def _plain(value):
    """Arguments pickle by value; a callable among them (a higher-order op's body) is not described."""
    if callable(value) and not isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        raise _Uncacheable(f"argument {value!r} is a callable")
    return value


def _nodes_back(value, made: dict[str, fx.Node]):
    return fx.node.map_aggregate(value, lambda x: made[x.name] if isinstance(x, _Ref) else x)


def _target_ref(node: fx.Node):
    """A call's target as names: ("op", "aten::add", "Tensor") for an operator overload, ("function",
    module, qualified name) for a Python function that imports back as itself; other ops' targets are strings."""
    target = node.target
    if node.op != "call_function":
        return target
    if isinstance(target, torch._ops.OpOverload):
        return ("op", target._schema.name, target._overloadname)
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    try:
        found = _function(module, name) if module is not None and name is not None else None
    except (ImportError, AttributeError):
        found = None
    if found is not target:
        raise _Uncacheable(f"call target {target!r} does not import back as itself")
    return ("function", module, name)


def _target_back(target):
    if not isinstance(target, tuple):
        return target
    kind, first, second = target
    if kind == "op":
        namespace, _, name = first.partition("::")
        packet = getattr(getattr(torch.ops, namespace), name)
        return getattr(packet, second or "default")
    return _function(first, second)


def _function(module: str, qualified_name: str):
    """The object `module`.`qualified_name`; ImportError or AttributeError where there is none."""
    value = importlib.import_module(module)
    for part in qualified_name.split("."):
        value = getattr(value, part)
    return value
