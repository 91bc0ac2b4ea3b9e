"""Per-rank loading from HF safetensors checkpoints: each rank reads only its own slices.

A checkpoint is a directory with `model.safetensors`, or with `model.safetensors.index.json`
and the shards it names, or a single `.safetensors` file. Tensors are read through
`safe_open(...).get_slice(name)`, so a rank never holds more of a tensor than its part, and
the full model is never materialized. Non-persistent buffers (rotary `inv_freq`) are not in
checkpoints: they are recomputed on the CPU from their module, as transformers does.

Models whose in-memory weights differ from the checkpoint format (Mixtral's fused
`mlp.experts.gate_up_proj` is stored as per-expert `block_sparse_moe.experts.<e>.w1/w3.weight`)
are read through transformers' own conversion mapping (`Conversions`): a renamed tensor is read
by slices like any other, a converted one is built whole from its sources, one at a time, and
the rank's part is cut from it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import stat
import warnings
from functools import partial
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from fxtp.capture.state_names import parse_derived
from fxtp.sharding.layouts import Layout, Shard

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    pass


def tensor_files(path: str) -> dict[str, str]:
    """{tensor name: safetensors file} of a checkpoint directory or file. Files an index names must lie
    inside the checkpoint directory and be regular files: nothing else is ever opened."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isfile(os.path.join(path, INDEX)):
        return indexed_files(path)
    elif os.path.isfile(os.path.join(path, SINGLE)):
        files = [os.path.join(path, SINGLE)]
    else:
        raise CheckpointError(f"{path}: no {SINGLE}, {INDEX} or .safetensors file there; save the model with "
                              "model.save_pretrained(path) (safetensors is its default format)")
    names = {}
    for file in files:
        with opened(file) as f:
            names.update({name: file for name in f.keys()})
    return names


def indexed_files(directory: str) -> dict[str, str]:
    """The weight_map of `directory`'s index, checked: JSON with a {tensor name: file name} weight_map
    whose files are regular files inside `directory`."""
    index = os.path.join(directory, INDEX)
    try:
        with open(index) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index} is not valid JSON ({error}): save the checkpoint again with "
                              "model.save_pretrained(path)") from error
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} has no \"weight_map\" of tensor names to file names (got "
                              f"{type(weight_map).__name__}): save the checkpoint again with model.save_pretrained(path)")
    root = os.path.abspath(directory)
    for file in sorted(set(weight_map.values())):
        # inside as named: no absolute path, no "..". The file itself may be a symlink (the HF hub cache
        # links each snapshot file to a blob outside the snapshot), but must end at a regular file.
        named = os.path.normpath(os.path.join(root, file))
        if os.path.isabs(file) or os.path.commonpath([root, named]) != root:
            raise CheckpointError(f"{index} names {file!r}, which lies outside the checkpoint directory {root}: "
                                  "fxtp reads only files inside it; fix the index's weight_map")
        if not os.path.exists(named):
            raise CheckpointError(f"{index} names {file!r}, which does not exist: is the checkpoint complete?")
        if not stat.S_ISREG(os.stat(named).st_mode):
            raise CheckpointError(f"{index} names {file!r}, which is not a regular file: fxtp reads only regular "
                                  "safetensors files")
    return {name: os.path.join(directory, file) for name, file in weight_map.items()}


@contextlib.contextmanager
def opened(file: str):
    """safe_open(file) whose failures (a truncated or corrupted file, not safetensors) name the file."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file ({error}): it may be truncated or "
                              "corrupted; save or copy it again") from error
    with handle:
        yield handle


def leftover_tensors(model: torch.nn.Module, names, conversions: "Conversions") -> tuple[list[str], list[str]]:
    """(unexpected, ignored): checkpoint tensors the model has no place for. `unexpected` ones name a
    module of the model (a bias the model's projection does not have: a checkpoint of another model or
    config); `ignored` ones name none. Tensors transformers itself ignores on load are neither."""
    own = {name for name, _ in [*model.named_parameters(remove_duplicate=False),
                                *model.named_buffers(remove_duplicate=False)]}
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected, ignored = [], []
    for name in sorted(names):
        if name in own or conversions.consumes(name) or any(p.search(name) for p in ignore):
            continue
        (unexpected if _names_a_module(model, name.rpartition(".")[0]) else ignored).append(name)
    return unexpected, ignored


class RankLoader:
    """`loader(name, layout)`: this rank's part of a state tensor, read from the checkpoint onto
    `device` and cast to the model's dtype there."""

    def __init__(self, path: str, rank: int, state: dict[str, torch.Tensor], aliases: dict[str, list[str]],
                 model: Optional[torch.nn.Module], device: torch.device = torch.device("cpu")):
        self.path, self.rank, self.state, self.aliases, self.model = path, rank, state, aliases, model
        self.device = device
        self.files = tensor_files(path)
        self.conversions: Optional[Conversions] = None  # indexed on the first tensor not found by name
        if model is not None:
            self._check_leftovers()

    def _check_leftovers(self) -> None:
        """Refuse a checkpoint with tensors for the model's modules that the model does not have (they
        would be dropped, and the result would be another model's); warn of other unused ones, as
        transformers' from_pretrained does."""
        self.conversions = Conversions(self.model, self.files)
        unexpected, ignored = leftover_tensors(self.model, self.files, self.conversions)
        if unexpected:
            raise CheckpointError(f"checkpoint {self.path} has tensors the model's modules do not have: "
                                  f"{_few(unexpected)}; it is not a checkpoint of this model or config (e.g. "
                                  "biases where the config has none): load it with its own config")
        if ignored:
            warnings.warn(f"checkpoint {self.path} has tensors the model does not use, left unread: {_few(ignored)}")

    def __call__(self, name: str, layout: Layout) -> torch.Tensor:
        derived = parse_derived(name)  # a block of a stored tensor: only the block's part is read
        source, block = (derived[0], derived[1:]) if derived is not None else (name, None)
        expected = self.state[name]
        names = [source, *self.aliases.get(source, [])]
        stored = next((n for n in names if n in self.files), None)
        if stored is None and self.model is not None:  # stored under another name or in another form?
            stored = next((s for n in names if (s := self.conversions.renamed.get(n)) is not None), None)
            built = next((n for n in names if n in self.conversions.targets), None)
            if stored is None and built is not None:
                full = self.conversions.build(built, self._read_whole)
                if tuple(full.shape) != tuple(self.state[source].shape):
                    raise CheckpointError(f"{source!r} built by transformers' conversion mapping from checkpoint "
                                          f"tensors {_few(self.conversions.sources(built))} has shape "
                                          f"{list(full.shape)} but the model's is {list(self.state[source].shape)}: "
                                          "the config does not match the checkpoint")
                return _cast(read_part(full, block, layout, self.rank).clone(), expected, source)
        if stored is None:
            if not isinstance(expected, torch.nn.Parameter) and self.model is not None:
                return read_part(recompute_buffer(self.model, source), block, layout, self.rank).to(expected.dtype)
            near = [n for n in self.files if n.rsplit(".", 1)[-1] == source.rsplit(".", 1)[-1]][:3] or list(self.files)[:3]
            raise CheckpointError(f"checkpoint {self.path} has no tensor {source!r}"
                                  f"{' (or ' + ', '.join(self.aliases[source]) + ')' if self.aliases.get(source) else ''}; "
                                  f"it has e.g. {near}: is it a checkpoint of this model?")
        # one opening per tensor: the file's pages mapped for it are released as soon as the
        # tensor is copied out, so a rank's peak memory stays near its own share
        with opened(self.files[stored]) as handle:
            view = handle.get_slice(stored)
            shape = tuple(view.get_shape())
            if shape != tuple(self.state[source].shape):
                raise CheckpointError(f"checkpoint tensor {stored!r} has shape {list(shape)} but the model's "
                                      f"{source!r} is {list(self.state[source].shape)}: the config does not match "
                                      "the checkpoint")
            # copied out, so nothing keeps the file mapped: pages read for a column slice (which
            # touches every row of the tensor) are released with it instead of staying resident. A
            # GPU's copy is that copy: a clone first would pass over every byte once more
            value = read_part(view, block, layout, self.rank) if isinstance(layout, Shard) or block is not None \
                else handle.get_tensor(stored)
            return _cast(value.clone() if self.device.type == "cpu" else value.to(self.device), expected, stored)

    def _read_whole(self, name: str) -> torch.Tensor:
        """A whole checkpoint tensor (a source of a converted one), copied out of the file."""
        with opened(self.files[name]) as handle:
            return handle.get_tensor(name).clone()


class Conversions:
    """The state tensors that transformers' conversion mapping makes from checkpoint tensors
    stored under other names or in another form, found with transformers' own rules
    (`get_model_conversion_mapping`, `rename_source_key`: the same API in 5.17 and 5.24).

    `renamed`: {state name: checkpoint name} where a tensor is only renamed
        (`block_sparse_moe.gate.weight` -> `mlp.gate.weight`): read by slices like any other.
    `targets`: {state name: group} where the mapping's `WeightConverter` builds the tensor from
        several (`experts.<e>.w1.weight`, `experts.<e>.w3.weight` -> `experts.gate_up_proj`);
        `build` reads the group's sources and runs the converter's operations on them."""

    def __init__(self, model: torch.nn.Module, checkpoint_names):
        self.model = model
        self.renamed: dict[str, str] = {}
        self.targets: dict[str, str] = {}  # converted state name -> the key of its group
        self.groups: dict[str, tuple[object, list[tuple[str, str]]]] = {}  # key -> (converter, [(name, pattern)])
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
        except ImportError:  # a transformers without conversion mappings stores what it holds
            return
        if not hasattr(model, "base_model_prefix"):  # not a transformers model
            return
        mapping = get_model_conversion_mapping(model)
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
        by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        state = model.state_dict()  # on meta: names and shapes only
        # sorted as transformers sorts, so a converter collects its sources (experts 0, 1, ..., 10) in order
        for name in sorted(checkpoint_names, key=dot_natural_key):
            renamed, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
            if renamed == name or renamed not in state:
                continue
            if pattern is None:
                self.renamed[renamed] = name
                continue
            converter = by_pattern[pattern]
            self.groups.setdefault(renamed, (converter, []))[1].append((name, pattern))
            # a one-to-many converter (qkv -> q, k, v) is keyed by its first target, as transformers does
            for target in converter.target_patterns:
                self.targets[renamed.replace(converter.target_patterns[0], target)] = renamed

    def consumes(self, checkpoint_name: str) -> bool:
        """Whether the mapping reads `checkpoint_name` for some state tensor (renamed, or a source)."""
        return checkpoint_name in self.renamed.values() or \
            any(checkpoint_name == source for _, sources in self.groups.values() for source, _ in sources)

    def sources(self, name: str) -> list[str]:
        return [source for source, _ in self.groups[self.targets[name]][1]]

    def build(self, name: str, read) -> torch.Tensor:
        """The full tensor `name`, made by its converter from its sources read with `read(checkpoint
        name)`; the sources are freed when it returns."""
        key = self.targets[name]
        template, sources = self.groups[key]
        converter = copy.deepcopy(template)  # it collects tensors: one instance per target, as transformers does
        for source, pattern in sources:
            converter.add_tensor(key, source, pattern, partial(read, source))  # read when it converts
        try:
            built = converter.convert(key, model=self.model, config=getattr(self.model, "config", None))
        except Exception as error:  # e.g. experts of unequal shapes, or one missing
            raise CheckpointError(f"transformers' conversion mapping could not build {name!r} from checkpoint "
                                  f"tensors {_few(self.sources(name))} ({error}): is the checkpoint complete and of "
                                  "this model?") from error
        if name not in built:
            raise CheckpointError(f"transformers' conversion of {_few(self.sources(name))} made {sorted(built)}, "
                                  f"not {name!r}")
        tensor = built[name]
        return tensor[0] if isinstance(tensor, list) else tensor


def _names_a_module(model: torch.nn.Module, path: str) -> bool:
    """Whether `path` is a submodule of `model` (the model itself, "", is not one)."""
    try:
        return bool(path) and model.get_submodule(path) is not None
    except AttributeError:
        return False


def kind(dtype: torch.dtype) -> str:
    """bool, integer, floating or complex: a cast between kinds changes what the values mean."""
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"


def _cast(value: torch.Tensor, expected: torch.Tensor, name: str) -> torch.Tensor:
    """`value` in the model's dtype; a cast to another kind (an int64 checkpoint tensor into a float
    weight) is refused, since it would load numbers that never were weights."""
    if kind(value.dtype) != kind(expected.dtype):
        raise CheckpointError(f"checkpoint tensor {name!r} is {value.dtype} but the model's is {expected.dtype}: "
                              f"fxtp casts within a kind ({kind(expected.dtype)}) only; is it a checkpoint of this model?")
    return value.to(expected.dtype)


def _few(names: list[str], most: int = 3) -> str:
    """A list of names for an error message, cut after `most`."""
    return str(names[:most])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > most else "]")


def read_part(view, block: Optional[tuple[int, int, int]], layout: Layout, rank: int) -> torch.Tensor:
    """The rank's part of a safetensors slice (or a tensor), within `block` = (dim, start, end)
    for a derived state: a Shard on the block's dim is read at its ranges offset by `start`."""
    if block is None:
        return _slice(view, layout, rank)
    dim, start, end = block
    lead = (slice(None),) * dim
    if isinstance(layout, Shard) and layout.dim == dim:
        pieces = [view[lead + (slice(start + lo, start + hi),)] for lo, hi in layout.owned_ranges(rank)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
    return _slice(view[lead + (slice(start, end),)], layout, rank)


def _slice(view, layout: Layout, rank: int) -> torch.Tensor:
    """Read only the rank's ranges of a safetensors slice (or a tensor)."""
    if not isinstance(layout, Shard):
        return view
    lead = (slice(None),) * layout.dim
    pieces = [view[lead + (slice(lo, hi),)] for lo, hi in layout.owned_ranges(rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, layout.dim)


def recompute_buffer(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A buffer that checkpoints don't store, rebuilt on the CPU by the model's own initializer."""
    path, _, leaf = name.rpartition(".")
    owner = copy.deepcopy(model.get_submodule(path)).to_empty(device="cpu")
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise CheckpointError(f"buffer {name!r} is not in the checkpoint and {type(model).__name__} has no "
                              "_init_weights to recompute it")
    init(owner)
    return getattr(owner, leaf)
