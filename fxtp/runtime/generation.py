"""Token generation with a sharded static KV cache: prefill, then one-token decode steps.

Each step runs the program of fxtp/capture/static_cache.py on every rank (for an encoder-decoder model:
the encoder once per request, then decoder steps from its start token, fxtp/capture/seq2seq_cache.py);
the logits come out gathered and identical on all ranks, so greedy choices, and sampling seeded
the same on every rank, pick the same tokens everywhere without another collective. Inputs are
built the way HF `generate` builds them for left-padded batches (position ids from the mask's
cumulative sum).
"""
from __future__ import annotations

import contextlib
import linecache
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fxtp.decode.compiled_graph import start_compile_workers
from fxtp.decode.decode_graph import DecodeGraph
from fxtp.sharding.collectives import process_group_named
from fxtp.decode.options import DecodeOptions, decode_options
from fxtp.rank_ops.inputs import checked_inputs
from fxtp.decode.prefill_graph import PrefillGraph
from fxtp.capture.seq2seq_cache import decoder_start_token_id
from fxtp.runtime.fail_fast import failing_fast
from fxtp.runtime.rank_agreement import check_ranks_agree
from fxtp.runtime.simulate import simulate as run_lockstep
from fxtp.capture.static_cache import is_cache_state

CACHE_GRANULE = 256  # cache lengths are rounded up to this, so nearby requests reuse one program


class Generator:
    """Generates on the ranks `ranks` of `program`, all in this process (one rank under torchrun).
    The weights are placed on `device` once; the step with a static cache is captured and planned
    once, and its rank graphs are made per batch size and cache length, of which only the latest
    one's cache is kept. `compile` (True, a DecodeOptions or a
    dict of its fields: fxtp/decode/options.py) runs decode steps as a compiled CUDA graph
    (fxtp/decode/decode_graph.py) and prefills with the step compiled for any prompt length
    (fxtp/decode/prefill_graph.py); it is a collective when there are several ranks, so every rank
    creates its Generator at the same point, and `compile_options` then holds the resolved
    DecodeOptions (None without compile)."""

    def __init__(self, program, ranks: list[int], group_name: str, device: torch.device,
                 checkpoint: Optional[str] = None, compile: Union[bool, dict, DecodeOptions] = False):
        self.program, self.ranks, self.group_name, self.device = program, ranks, group_name, device
        self.checkpoint = checkpoint
        self.compile_options = None if compile is False else \
            decode_options(compile, group_name, program.world_size, device)
        if self.compile_options is not None:
            start_compile_workers()
        self._weights: list[dict] = [{} for _ in ranks]  # per rank: reused by every cache program
        self._key: Optional[tuple[int, int]] = None
        self._modules: list[fx.GraphModule] = []
        self._sources: set[str] = set()  # torch.fx's generated sources of _modules, dropped with them
        self._decode = self._prefill = None
        self._prefill_regions: dict = {}  # compiled once, for the caches of every batch size and length
        self._encoders: list[fx.GraphModule] = []  # an encoder-decoder's encoder, run once per request
        self.current_cache = None  # the HF-facing cache whose tokens the buffers hold (fxtp/runtime/sharded_cache.py)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
                 seed: int = 0, streamer=None, max_length: Optional[int] = None) -> torch.Tensor:
        """[batch, prompt + new] token ids, like HF `model.generate`: left-padded prompts with their
        attention_mask, greedy or sampled (temperature, then top_k, then top_p, from a generator
        seeded with `seed`), stopping a row at `eos_token_id` (then padding it with `pad_token_id`);
        both default to the model's generation_config as in HF, and eos_token_id=[] never stops.
        `streamer` gets put(prompt) and put(tokens) per step on the CPU, then end(), as in HF.
        The cache holds `max_length` tokens (default: prompt + max_new_tokens rounded up).
        An encoder-decoder model encodes the (right- or left-padded) batch once and returns, as HF
        does, the decoder's tokens: its start token, then the new ones."""
        arguments = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                         top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                         max_length=max_length)
        if len(self.ranks) == 1 and self.program.world_size > 1:  # one rank of several processes
            with failing_fast(self.group_name, self.ranks[0]):
                check_ranks_agree(process_group_named(self.group_name), "generate() arguments",
                                  dict(input_ids=input_ids, attention_mask=attention_mask, **arguments,
                                       streamer=streamer is not None))
                return self._generate(input_ids, attention_mask, streamer=streamer, **arguments)
        return self._generate(input_ids, attention_mask, streamer=streamer, **arguments)

    def _generate(self, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                  eos_token_id, pad_token_id, seed, streamer, max_length) -> torch.Tensor:
        input_ids, mask = _checked(input_ids, attention_mask, self.device)
        batch, prompt = input_ids.shape
        for name, value in (("max_new_tokens", max_new_tokens), ("max_length", max_length)):
            if (value is not None or name == "max_new_tokens") and \
                    (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        seq2seq = self.program.is_seq2seq
        cached = 1 if seq2seq else prompt  # tokens in the cache before the new ones: the decoder's start token
        needed = cached + max_new_tokens
        length = max_length or -(-needed // CACHE_GRANULE) * CACHE_GRANULE
        if needed > length:
            raise ValueError(f"prompt ({cached}) + max_new_tokens ({max_new_tokens}) exceed max_length={length}")
        self.prepare(batch, length)
        cache_positions = torch.arange(length, device=self.device)
        with torch.no_grad():
            if seq2seq:  # the encoder runs once; every decoder step attends to its output
                encoded = self.encode(input_ids, mask)
                first = torch.full((batch, 1), decoder_start_token_id(self.program.model), device=self.device)

                def step(ids: torch.Tensor, i: int) -> torch.Tensor:
                    return self.step((ids, encoded, mask, cache_positions[i:i + 1]), decode=True)
            else:  # prefill the prompt, then one token per step
                first, full_mask = input_ids, torch.ones(batch, length, dtype=torch.long, device=self.device)
                full_mask[:, :prompt] = mask
                positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)

                def step(ids: torch.Tensor, i: int) -> torch.Tensor:
                    if i == 0:
                        return self.step((ids, full_mask, positions, cache_positions[:prompt]), decode=False)
                    return self.step((ids, full_mask, positions[:, -1:] + i, cache_positions[prompt + i - 1:][:1]),
                                      decode=True)
            return self._loop(first, step, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                              pad_token_id, seed, streamer)

    def _loop(self, first: torch.Tensor, step, max_new_tokens: int, do_sample: bool, temperature: float,
              top_k: Optional[int], top_p: Optional[float], eos_token_id, pad_token_id: Optional[int], seed: int,
              streamer) -> torch.Tensor:
        """`first` followed by up to max_new_tokens tokens, the i-th picked from step(previous tokens, i)'s
        logits; eos, pad and forced tokens as HF reads them from the generation config."""
        defaults = getattr(self.program.model, "generation_config", None)
        eos = _token_list(eos_token_id if eos_token_id is not None else getattr(defaults, "eos_token_id", None))
        pad = next((p for p in (pad_token_id, getattr(defaults, "pad_token_id", None)) if p is not None), (eos or [0])[0])
        # HF's ForcedBOS/ForcedEOS logits processors: the first token after a one-token start, the last one
        forced_bos = _token_list(getattr(defaults, "forced_bos_token_id", None)) if first.shape[1] == 1 else []
        forced_eos = _token_list(getattr(defaults, "forced_eos_token_id", None))
        rng = torch.Generator(self.device).manual_seed(seed) if do_sample else None
        warpers = sampling_warpers(temperature, top_k, top_p) if do_sample else None
        unfinished = torch.ones(first.shape[0], dtype=torch.bool, device=self.device)
        eos_ids = torch.tensor(eos, device=self.device) if eos else None
        out = [first]
        if streamer is not None:
            streamer.put(first.cpu())
        handoff = _Handoff(first.shape[0], self.device) if streamer is not None or eos_ids is not None else None
        previous = None  # the handoff slot of the last token not yet given to the host
        tokens = first
        for i in range(max_new_tokens):
            logits = step(tokens, i).float()
            forced = forced_bos if i == 0 else forced_eos if i == max_new_tokens - 1 else []
            if forced:  # every other token's score is -inf
                allowed = torch.tensor(forced, device=logits.device)
                logits = torch.full_like(logits, float("-inf")).index_fill_(-1, allowed, 0)
            tokens = next_tokens(logits, warpers, rng)
            if eos_ids is not None:
                tokens = torch.where(unfinished, tokens, pad)
                unfinished &= ~torch.isin(tokens, eos_ids)
            out.append(tokens[:, None])
            if handoff is not None:
                # this step is queued before Python waits for the previous token, so the GPU runs on
                current = handoff.push(tokens, unfinished)
                if previous is not None and not handoff.give(previous, streamer):
                    out.pop()  # every row had finished before this step: HF stops there
                    previous = None
                    break
                previous = current
            tokens = tokens[:, None]
        if previous is not None:
            handoff.give(previous, streamer)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)

    def memory(self) -> dict[str, int]:
        """Bytes this process holds for the first of its ranks: weights and KV cache."""
        if not self._modules:
            raise RuntimeError("nothing is allocated before the first generate() call")
        module = self._modules[0]
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        cache = sum(t.nbytes for name, t in tensors.items() if is_cache_state(name))
        return {"parameters": sum(t.nbytes for t in tensors.values()) - cache, "cache": cache}

    def prepare(self, batch: int, length: int) -> None:
        """Make the ranks' programs for a static cache of `batch` sequences of `length` tokens (kept
        while the shape stays the same). The cache keeps what earlier steps wrote; a new generation
        overwrites it from position 0 on, and the causal mask hides what lies beyond."""
        if self._key == (batch, length):
            return
        # free the previous cache first; the key goes with it, so a build that fails leaves no stale key
        forget_sources(self._sources)
        self._modules, self._decode, self._prefill, self._key, self._sources = [], None, None, None, set()
        cached = self.program.with_cache(batch, length)
        sources = generated_sources()
        self._modules = [cached.rank_graph(rank, self.group_name, self.device, self.checkpoint, shared=weights)
                         for rank, weights in zip(self.ranks, self._weights)]
        self._sources = generated_sources() - sources  # the rank graphs' and their clean-ups' recompiles
        if self.compile_options is not None:
            self._decode = DecodeGraph(self._modules[0], self.compile_options)
            if self.compile_options.compile_prefill:
                self._prefill = PrefillGraph(self._modules[0], self.compile_options, self._prefill_regions)
        self._key = (batch, length)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """An encoder-decoder model's encoder output for the batch."""
        if not self._encoders:
            encoder = self.program.encoder()
            self._encoders = [encoder.rank_graph(rank, self.group_name, self.device, self.checkpoint, shared=weights)
                              for rank, weights in zip(self.ranks, self._weights)]
        return self._run(self._encoders, (input_ids, attention_mask))

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Put row rows[i] of every rank's KV cache in row i (beam search keeps the beams it picked).
        In place, so a compiled step, which reads the same tensors, sees it."""
        for module in self._modules:
            for name, cache in module.named_buffers():
                if is_cache_state(name):
                    cache.copy_(cache.index_select(0, rows.to(cache.device)))

    def step(self, args: tuple, decode: bool) -> torch.Tensor:
        """One step's logits [batch, vocab] of the prepared programs: the prompt's
        (input_ids, mask, positions, cache positions) when not `decode`, one token's when it is (an
        encoder-decoder's: decoder ids, encoder output, mask, cache position). From the CUDA graph they are its output tensor, which the next replay
        overwrites: _loop picks its tokens from them before it takes the next step."""
        compiled = self._decode if decode else self._prefill
        if compiled is not None:
            return compiled(*args)
        return self._run(self._modules, args)

    @staticmethod
    def _run(modules: list[fx.GraphModule], args: tuple) -> torch.Tensor:
        if len(modules) > 1:
            outputs = run_lockstep(modules, args, {})
            nan = [rank for rank, out in enumerate(outputs) if out.isnan().any()]
            if nan:
                raise FloatingPointError(f"the logits are NaN on ranks {nan}: the model computes NaN on these inputs "
                                         "(check the weights and, in float16, overflow); fxtp.simulate shows the same")
            if not all(torch.equal(out, outputs[0]) for out in outputs):
                raise RuntimeError("ranks computed different outputs; please report this as an fxtp bug")
            return outputs[0]
        return modules[0](*args)


class _Handoff:
    """Each step's tokens, and whether any row is unfinished, copied to the host without waiting,
    into two pinned buffers used in turn: the loop queues the next step before it waits for them."""

    def __init__(self, batch: int, device: torch.device):
        pinned = device.type == "cuda"
        self.tokens = [torch.empty(batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.unfinished = [torch.empty((), dtype=torch.bool, pin_memory=pinned) for _ in range(2)]
        self.copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.pushed = 0

    def push(self, tokens: torch.Tensor, unfinished: torch.Tensor) -> int:
        """Queue the copies; returns the slot to give()."""
        slot = self.pushed % 2
        self.pushed += 1
        self.tokens[slot].copy_(tokens, non_blocking=True)
        self.unfinished[slot].copy_(unfinished.any(), non_blocking=True)
        if self.copied[slot] is not None:
            self.copied[slot].record()
        return slot

    def give(self, slot: int, streamer) -> bool:
        """Wait for the slot's copies, put its tokens to the streamer; whether any row goes on."""
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        if streamer is not None:
            streamer.put(self.tokens[slot].clone())
        return bool(self.unfinished[slot])


def sampling_warpers(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> LogitsProcessorList:
    """HF's own warpers, in HF's order (temperature, then top_k, then top_p): they read only the scores."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None and top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def next_tokens(logits: torch.Tensor, warpers: Optional[LogitsProcessorList],
                rng: Optional[torch.Generator]) -> torch.Tensor:
    """The next token per row from float logits [batch, vocab]: the best one, or (with `warpers`)
    one drawn from the warped distribution with `rng`."""
    if warpers is None:
        return logits.argmax(dim=-1)
    return torch.multinomial(warpers(None, logits).softmax(dim=-1), 1, generator=rng).squeeze(-1)


def generated_sources() -> set[str]:
    """The keys of torch.fx's global cache of generated source (kept for tracebacks, never evicted):
    every GraphModule.recompile() adds one."""
    return set(getattr(getattr(fx.graph_module, "_loader", None), "eval_cache", {}))


@contextlib.contextmanager
def collecting_sources(into: set[str]):
    """Add to `into` the keys of the torch.fx sources generated inside (see generated_sources)."""
    before = generated_sources()
    try:
        yield
    finally:
        into.update(generated_sources() - before)


def forget_sources(keys: set[str]) -> None:
    """Drop generated sources of GraphModules no longer used from torch.fx's cache and linecache: a
    generator that changes shape every call would otherwise grow them by its graphs' sources each time."""
    cache = getattr(getattr(fx.graph_module, "_loader", None), "eval_cache", {})
    for key in keys:
        cache.pop(key, None)
        linecache.cache.pop(key, None)


def _token_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    return ids


def _checked(input_ids, attention_mask, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and their mask on `device`, checked as a rank graph checks them."""
    input_ids, attention_mask = (x.to(device) if isinstance(x, torch.Tensor) else x for x in (input_ids, attention_mask))
    return input_ids, checked_inputs(input_ids, attention_mask, device)
