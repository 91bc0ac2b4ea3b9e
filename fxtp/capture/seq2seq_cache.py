"""Capture an encoder-decoder LM for generation: its encoder once per request, its decoder per token.

    encoder  (input_ids [B, S], attention_mask [B, S]) -> last_hidden_state [B, S, H]
    decoder  (decoder_input_ids [B, 1], encoder_hidden_states [B, S, H], attention_mask [B, S],
              cache_position [1]) -> the last position's logits [B, vocab]

B and S are dynamic in the encoder; in the decoder B and the cache length L are fixed and S is
dynamic. The decoder's self-attention cache is static, as in fxtp/capture/static_cache.py (buffers
"kv_cache.key_<i>" / "kv_cache.value_<i>" written with `aten.index_copy_`, sharded on heads).
Its cross-attention cache is a fresh DynamicCache per call, which stores nothing across steps:
every step recomputes the cross-attention k/v from encoder_hidden_states (two GEMMs per layer
over S rows, cheap next to the weights they read anyway), so the graph holds no per-request state
beyond the self-attention cache.
"""
from __future__ import annotations

import torch
from torch.export import Dim
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache, StaticLayer

from fxtp.capture.export import Captured, export_model, flatten_model, max_positions, model_device
from fxtp.capture.signatures import ENCODER, SEQ2SEQ, Signature, signature_of
from fxtp.capture.static_cache import bind_cache, buffered_cache, cache_argument, cache_buffers, with_cache_state

ENCODER_INPUTS = ("input_ids", "attention_mask")
DECODER_INPUTS = ("decoder_input_ids", "encoder_hidden_states", "attention_mask", "cache_position")


def decoder_start_token_id(model: torch.nn.Module) -> int:
    """The first decoder token, from the generation config, else the model config (as HF reads it)."""
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "decoder_start_token_id", None)
        if value is not None:
            return value
    raise ValueError(f"{type(model).__name__} has no decoder_start_token_id in its generation or model config")


class _Encoded(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # state names read "model.<HF name>", the names of the whole model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _DecodedLogits(torch.nn.Module):
    """The model's decoder with a static self-attention cache whose tensors are this module's buffers."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int, device: torch.device):
        super().__init__()
        self.model = model
        self.cache_argument = cache_argument(model)
        shapes = self_attention_shapes(model, batch_size, max_length, device)
        self.cache = Cache(layers=[StaticLayer(max_length) for _ in shapes])
        self.kv_cache = cache_buffers(shapes, model, device)

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, cache_position):
        bind_cache(self.cache, *buffered_cache(self.kv_cache, len(self.cache.layers)), cache_position)
        cache = EncoderDecoderCache(self.cache, DynamicCache())  # cross-attention k/v: recomputed each step
        out = self.model(attention_mask=attention_mask, encoder_outputs=(encoder_hidden_states,),
                         decoder_input_ids=decoder_input_ids, use_cache=True, **{self.cache_argument: cache})
        return out.logits[:, -1]


def self_attention_shapes(model: torch.nn.Module, batch_size: int, max_length: int,
                          device: torch.device) -> list[tuple[int, ...]]:
    """Per decoder layer [batch, heads, max_length, head_dim], read from one eager step with a
    dynamic cache: the configs name decoder layers, heads and head sizes differently."""
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    probe = EncoderDecoderCache(DynamicCache(), DynamicCache())
    # no encoder mask, and a 4-D decoder mask, which transformers takes as it is: it checks the values of
    # a 2-D one on the host (is any position padded?), which a model on meta has not (BART's decoder)
    decoder_mask = torch.zeros(1, 1, 1, 1, device=device)
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :1], decoder_attention_mask=decoder_mask, use_cache=True,
              **{cache_argument(model): probe})
    return [(batch_size, layer.keys.shape[1], max_length, layer.keys.shape[3])
            for layer in probe.self_attention_cache.layers]


def _checked_seq2seq(model: torch.nn.Module) -> torch.device:
    if signature_of(model).kind != SEQ2SEQ:
        raise TypeError(f"{type(model).__name__} is not an encoder-decoder LM")
    return model_device(model)


def capture_encoder(model: torch.nn.Module) -> Captured:
    """Export the encoder of `model` with dynamic batch and sequence length."""
    device = _checked_seq2seq(model)
    ids = torch.ones(2, 16, dtype=torch.long, device=device)
    dims = Signature(ENCODER, ENCODER_INPUTS).dynamic_shapes(4096, max(max_positions(model), ids.shape[1]))
    ep = export_model(model, _Encoded(model), (ids, torch.ones_like(ids)), None, dims,
                      ", its encoder for generation")
    return flatten_model(ep, model, ENCODER_INPUTS)


def capture_decoder(model: torch.nn.Module, batch_size: int, max_length: int) -> Captured:
    """Export one decoder step of `model` with a static self-attention cache of `batch_size` x `max_length`."""
    device = _checked_seq2seq(model)
    wrapper = _DecodedLogits(model, batch_size, max_length, device)
    hidden = model.config.get_text_config(decoder=True).hidden_size  # d_model in T5/BART configs' attribute maps
    source = 5  # != 1, so export keeps the encoder length apart from the decoder's one token
    args = (torch.ones(batch_size, 1, dtype=torch.long, device=device),
            torch.zeros(batch_size, source, hidden, device=device, dtype=wrapper.kv_cache.key_0.dtype),
            torch.ones(batch_size, source, dtype=torch.long, device=device),
            torch.zeros(1, dtype=torch.long, device=device))
    encoded = Dim.DYNAMIC(min=1, max=max(max_positions(model), source))
    ep = export_model(model, wrapper, args, None, (None, {1: encoded}, {1: encoded}, None),
                      ", its decoder with a static cache for generation")
    return with_cache_state(ep, model, DECODER_INPUTS)
