"""An fxtp program as a model that HF drives: `model.generate(...)`, `pipeline(...)` and `model(...)`.

The object is an instance of the HF model's own class (a subclass made per class) that holds no
weights, and whose forward runs the sharded program. So HF's generation loop (its logits processors,
stopping criteria, beam search and streamers) and the architecture's own `prepare_inputs_for_generation`
run unchanged, and so does every check a pipeline makes on its model. What fxtp replaces is:
- `forward`: the step of the sharded program with a static KV cache (fxtp/runtime/generation.py), or
  the program without a cache when none is passed;
- the cache HF passes between steps: a ShardedCache (fxtp/runtime/sharded_cache.py);
- `get_encoder` (encoder-decoder models): the sharded encoder;
- `generate`, with one process per rank: every rank must be given the same arguments (checked), and
  they share rank 0's random state, so sampling draws the same tokens everywhere from logits that
  are the same on every rank, with no collective per token.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Optional

import torch
import torch.distributed as dist
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, Seq2SeqLMOutput

from fxtp.capture.static_cache import cache_argument
from fxtp.runtime.fail_fast import failing_fast
from fxtp.runtime.generation import CACHE_GRANULE, Generator
from fxtp.runtime.rank_agreement import check_ranks_agree
from fxtp.runtime.sharded_cache import ShardedCache
from fxtp.sharding.collectives import process_group_named

# forward keywords HF's loop passes that change nothing here (cache_position: transformers < 5.2x)
IGNORED_INPUTS = ("use_cache", "return_dict", "cache_position", "logits_to_keep")
# generate() options the fxtp model cannot honour, and why
UNSUPPORTED_OPTIONS = {
    "assistant_model": "assisted decoding rolls the cache back, and fxtp's static cache cannot",
    "prompt_lookup_num_tokens": "prompt-lookup decoding rolls the cache back, and fxtp's static cache cannot",
    "output_attentions": "the sharded program returns logits only",
    "output_hidden_states": "the sharded program returns logits only",
    "dola_layers": "DoLa reads hidden states, and the sharded program returns logits only",
}


@dataclasses.dataclass
class ParallelRuntime:
    """What an fxtp model runs on: the program, the Generator holding this process's ranks and their KV
    cache, and (one rank per process) that rank and its process group; rank None runs every rank here."""
    program: Any  # fxtp.TPProgram
    generator: Generator
    rank: Optional[int]
    # the group by name, not the object: a model kept to the end of the process must not keep the group
    # alive past its destroy_process_group, or gloo's threads are torn down at interpreter exit (SIGABRT)
    group_name: Optional[str]
    device: torch.device
    dtype: torch.dtype
    cacheless: Any = None  # this rank's module without a cache, made at the first call that needs it

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        return None if self.group_name is None else process_group_named(self.group_name)


class ParallelModel:
    """Mixed in before the HF model's class (see hf_model); `fxtp_runtime` holds the program."""
    fxtp_runtime: ParallelRuntime

    @property
    def device(self) -> torch.device:
        return self.fxtp_runtime.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fxtp_runtime.dtype

    def __repr__(self) -> str:
        runtime = self.fxtp_runtime
        where = "every rank in this process" if runtime.rank is None else f"rank {runtime.rank}"
        return (f"{type(self).__name__} sharded by fxtp over {runtime.program.world_size} ranks "
                f"({where}, {runtime.device})")

    def get_encoder(self, *args, **kwargs) -> torch.nn.Module:
        return ShardedEncoder(self.fxtp_runtime)

    def generate(self, *args, **kwargs):
        _refuse_unsupported(kwargs, kwargs.get("generation_config") or self.generation_config)
        runtime = self.fxtp_runtime
        if runtime.group is None:
            return super().generate(*args, **kwargs)
        with failing_fast(runtime.group.group_name, runtime.rank):
            check_ranks_agree(runtime.group, "generate() arguments", fingerprint(args, kwargs))
            share_random_state(runtime.group, runtime.device)
            return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """HF's hook that puts a new cache in model_kwargs: here a ShardedCache of max_cache_length tokens
        (rounded up, so nearby requests reuse one program; one more for HF's deferred stop check)."""
        implementation = generation_config.cache_implementation
        if implementation not in (None, "static", "dynamic"):
            raise ValueError(f"cache_implementation={implementation!r}: an fxtp model keeps its own static, sharded "
                             "KV cache; leave cache_implementation unset")
        key = cache_argument(self.fxtp_runtime.program.model)
        given = model_kwargs.get(key)
        if given is not None:
            if not isinstance(given, ShardedCache):
                raise TypeError(f"an fxtp model keeps its own KV cache, so {key}= takes only a cache an fxtp model "
                                f"returned, not a {type(given).__name__}")
            return
        if generation_config.use_cache is False:
            return
        length = -(-(max_cache_length + 1) // CACHE_GRANULE) * CACHE_GRANULE
        model_kwargs[key] = ShardedCache(self.config, self.fxtp_runtime.generator, length)

    def _reorder_cache(self, cache: ShardedCache, beam_idx: torch.Tensor) -> ShardedCache:
        cache.reorder_cache(beam_idx)
        return cache

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None,
                encoder_outputs=None, **kwargs):
        """Logits like the HF model's: [batch, 1, vocab] for the last token when a cache is passed (HF's
        generate passes one), [batch, seq, vocab] without one."""
        key = cache_argument(self.fxtp_runtime.program.model)
        cache = kwargs.pop(key, None)
        _refuse_inputs(kwargs)
        if cache is not None and not isinstance(cache, ShardedCache):
            raise TypeError(f"an fxtp model keeps its own KV cache, so {key}= takes only a cache an fxtp model "
                            f"returned, not a {type(cache).__name__}")
        runtime = self.fxtp_runtime
        if self.config.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids")
            if cache is None:
                logits = cacheless_logits(runtime, input_ids, attention_mask, decoder_input_ids=decoder_input_ids)
            else:
                encoded = encoder_outputs[0] if encoder_outputs is not None else \
                    runtime.generator.encode(*_on(runtime.device, input_ids, attention_mask))
                logits = decoder_steps(runtime.generator, cache, decoder_input_ids, encoded, attention_mask)
            return Seq2SeqLMOutput(logits=logits, **{_cache_field(Seq2SeqLMOutput): cache})
        if input_ids is None:
            raise ValueError("an fxtp model takes input_ids (inputs_embeds are not supported)")
        if cache is None:
            if position_ids is not None and not torch.equal(position_ids.cpu(), _default_positions(input_ids).cpu()):
                raise ValueError("without a KV cache the sharded program numbers positions 0..seq-1 itself, and these "
                                 "position_ids differ (left padding): generate with use_cache=True (the default)")
            logits = cacheless_logits(runtime, input_ids, attention_mask)
        else:
            logits = causal_step(runtime.generator, cache, input_ids, attention_mask, position_ids)
        return CausalLMOutputWithPast(logits=logits, **{_cache_field(CausalLMOutputWithPast): cache})


class ShardedEncoder(torch.nn.Module):
    """An encoder-decoder model's sharded encoder, as HF's generate calls `model.get_encoder()`."""

    def __init__(self, runtime: ParallelRuntime):
        super().__init__()
        self.runtime = runtime

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> BaseModelOutput:
        _refuse_inputs(kwargs)
        if input_ids is None:
            raise ValueError("an fxtp model's encoder takes input_ids (inputs_embeds are not supported)")
        ids, mask = _on(self.runtime.device, input_ids, attention_mask)
        return BaseModelOutput(last_hidden_state=self.runtime.generator.encode(ids, mask))


def causal_step(generator: Generator, cache: ShardedCache, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """The last token's logits [batch, 1, vocab] for `input_ids` following the cache's tokens, written
    into the cache: the prompt's prefill when the cache is empty, then HF's one-token steps."""
    input_ids, attention_mask, position_ids = _on(generator.device, input_ids, attention_mask, position_ids)
    batch, new = input_ids.shape
    cache.claim()
    start, end = cache.seen, cache.seen + new
    if start == 0:
        generator.prepare(batch, cache.max_length)
        cache.mask = torch.ones(batch, cache.max_length, dtype=torch.long, device=generator.device)
        cache.slots = torch.arange(cache.max_length, device=generator.device)
    if end > cache.max_length or batch != cache.mask.shape[0]:
        raise ValueError(f"this cache holds {cache.mask.shape[0]} sequences of {cache.max_length} tokens; "
                         f"{batch} sequences of {end} tokens do not fit: start a new generation")
    if attention_mask is not None:
        if attention_mask.shape != (batch, end):
            raise ValueError(f"attention_mask must cover the cached and the new tokens, [{batch}, {end}], "
                             f"got {list(attention_mask.shape)}")
        cache.mask[:, :end] = attention_mask
    if position_ids is None:
        position_ids = (cache.slots[start:end]).expand(batch, new)
    logits = generator.step((input_ids, cache.mask, position_ids, cache.slots[start:end]), decode=start > 0 and new == 1)
    cache.seen = end
    return logits[:, None]


def decoder_steps(generator: Generator, cache: ShardedCache, decoder_input_ids: torch.Tensor, encoded: torch.Tensor,
                  attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """An encoder-decoder's decoder, one token at a time through its cache; the last one's logits."""
    decoder_input_ids, encoded, attention_mask = _on(generator.device, decoder_input_ids, encoded, attention_mask)
    batch, new = decoder_input_ids.shape
    cache.claim()
    if cache.seen == 0:
        generator.prepare(batch, cache.max_length)
        cache.slots = torch.arange(cache.max_length, device=generator.device)
    if cache.seen + new > cache.max_length:
        raise ValueError(f"this cache holds {cache.max_length} tokens; {cache.seen + new} do not fit: "
                         "start a new generation")
    if attention_mask is None:
        attention_mask = torch.ones(encoded.shape[:2], dtype=torch.long, device=generator.device)
    for token in range(new):
        slot = cache.slots[cache.seen:cache.seen + 1]
        logits = generator.step((decoder_input_ids[:, token:token + 1], encoded, attention_mask, slot), decode=True)
        cache.seen += 1
    return logits[:, None]


def cacheless_logits(runtime: ParallelRuntime, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     **inputs: torch.Tensor) -> torch.Tensor:
    """The program without a cache: every rank in lockstep here, or this rank's guarded module."""
    if input_ids is None:
        raise ValueError("without a KV cache an fxtp model takes input_ids (not encoder_outputs or inputs_embeds)")
    input_ids, attention_mask = _on(runtime.device, input_ids, attention_mask)
    inputs = {name: value.to(runtime.device) for name, value in inputs.items()}
    with torch.no_grad():
        if runtime.rank is None:
            return runtime.program.simulate(input_ids, attention_mask, checkpoint=runtime.generator.checkpoint, **inputs)
        if runtime.cacheless is None:
            runtime.cacheless = runtime.program.module(runtime.rank, runtime.device, runtime.group,
                                                       runtime.generator.checkpoint)
        return runtime.cacheless(input_ids, attention_mask, *inputs.values())


def fingerprint(args: tuple, kwargs: dict) -> dict[str, Any]:
    """generate()'s arguments as the ranks compare them: tensors and plain values as they are, a
    GenerationConfig by its fields, other objects (processors, criteria, tokenizers) by their type.
    The streamer is left out: a rank may stream while the others don't."""
    def plain(value):
        if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
            return value
        if isinstance(value, GenerationConfig):  # by its fields: generate may have put tensors in it
            return plain(value.to_dict())
        if isinstance(value, (list, tuple)):
            return [plain(v) if not isinstance(v, torch.Tensor) else describe_tensor(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) if not isinstance(v, torch.Tensor) else describe_tensor(v) for k, v in value.items()}
        return type(value).__name__
    named = {f"argument {i}": value for i, value in enumerate(args)} | kwargs
    return {name: plain(value) for name, value in named.items() if name != "streamer"}


def describe_tensor(value: torch.Tensor) -> str:
    return f"{value.dtype} {list(value.shape)} sum={value.double().sum().item()}"


def share_random_state(group: dist.ProcessGroup, device: torch.device) -> None:
    """Give every rank of `group` rank 0's random state (CPU, and the device's on CUDA)."""
    states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
    dist.broadcast_object_list(states, src=dist.get_global_rank(group, 0), group=group,
                               device=device if dist.get_backend(group) == "nccl" else None)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


@lru_cache(maxsize=None)
def parallel_class(base: type) -> type:
    """`base` with fxtp's forward, cache and generate mixed in first; same name, so pipelines that
    check the model's class name accept it."""
    return type(base.__name__, (ParallelModel, base), {"__module__": __name__, "__qualname__": base.__qualname__})


def hf_model(runtime: ParallelRuntime) -> torch.nn.Module:
    """A weightless instance of the program's HF model class, driven by `runtime`: it keeps the HF
    model's plain attributes (config, generation_config, name_or_path, ...), none of its modules."""
    source = runtime.program.model
    model = object.__new__(parallel_class(type(source)))
    torch.nn.Module.__init__(model)
    internal = set(vars(model))
    for name, value in vars(source).items():
        if name not in internal:
            model.__dict__[name] = value
    model.__dict__["fxtp_runtime"] = runtime
    return model.eval()


def _refuse_unsupported(kwargs: dict, config: GenerationConfig) -> None:
    for name, why in UNSUPPORTED_OPTIONS.items():
        value = kwargs.get(name, getattr(config, name, None))
        if value:
            shown = repr(value) if isinstance(value, (bool, int, float, str, list)) else type(value).__name__
            raise ValueError(f"generate({name}={shown}) is not supported by an fxtp model: {why}")
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("an fxtp model generates from input_ids; inputs_embeds are not supported")


def _refuse_inputs(kwargs: dict) -> None:
    """Raise for any input the sharded program would leave unread (a tensor: labels, inputs_embeds,
    token_type_ids, ...) and any output it can't give (output_attentions=True, ...). Other keywords
    pass, as HF's own forward lets them pass (generate hands it `tokenizer` with stop strings)."""
    refused = {name: value for name, value in kwargs.items() if name not in IGNORED_INPUTS and
               (isinstance(value, torch.Tensor) or (name in UNSUPPORTED_OPTIONS and value))}
    if refused:
        hint = UNSUPPORTED_OPTIONS.get(next(iter(refused)), "it takes input_ids, attention_mask and position_ids")
        raise TypeError(f"an fxtp model's forward does not take {sorted(refused)}: {hint}")


def _on(device: torch.device, *tensors):
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def _default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def _cache_field(output_class: type) -> str:
    """The output field holding the cache: "cache" (transformers >= 5.2x) or "past_key_values"."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output_class)} else "past_key_values"
