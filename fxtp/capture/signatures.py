"""Which inputs a model kind is captured with, and which output: the graph's signature.

    causal LM  (input_ids, attention_mask)                                          -> logits
    seq2seq    (input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> logits
    encoder    (input_ids, attention_mask[, token_type_ids])                        -> first output

An encoder's first output is its head's logits (masked LM, sequence classification), or the
base model's last_hidden_state. The kind is read from the config and transformers' own
registries, never from fxtp code per model: `is_encoder_decoder` makes a seq2seq model, an
encoder is a model type that transformers gives a masked-LM head and is not configured as a
decoder, and a causal LM has an output embedding (its lm_head).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch.export import Dim
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

__all__ = ["CAUSAL_LM", "SEQ2SEQ", "ENCODER", "InputSpec", "INPUTS", "TOKEN_IDS", "Signature", "signature_of",
           "Forward"]

CAUSAL_LM, SEQ2SEQ, ENCODER = "causal LM", "seq2seq LM", "encoder"


@dataclass(frozen=True)
class InputSpec:
    tokens: str           # the token-ids input whose [batch, seq] shape it has (itself for token ids)
    fill: Optional[int]   # its value where the caller passes None; None: the input is required


INPUTS = {
    "input_ids": InputSpec("input_ids", None),
    "attention_mask": InputSpec("input_ids", 1),
    "token_type_ids": InputSpec("input_ids", 0),  # HF's default: every token of segment 0
    "decoder_input_ids": InputSpec("decoder_input_ids", None),
    "decoder_attention_mask": InputSpec("decoder_input_ids", 1),
    "labels": InputSpec("input_ids", None),  # a training graph's targets (fxtp/capture/training.py)
}
TOKEN_IDS = tuple(name for name, spec in INPUTS.items() if spec.tokens == name)


@dataclass(frozen=True)
class Signature:
    kind: str
    inputs: tuple[str, ...]          # the graph's user inputs, in order (names from INPUTS)
    use_cache: Optional[bool] = False  # passed to forward as use_cache=...; None: not passed

    def example_inputs(self, model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> dict:
        """Inputs to export with: random token ids (ones on meta), masks of ones, token types of
        zeros. The decoder's sequence is shorter than the encoder's so export never unifies them."""
        seq = example_length(model.config, seq)
        lengths = {"input_ids": seq, "decoder_input_ids": max(2, seq - 3)}
        vocab = model.config.vocab_size
        values = {}
        for name in self.inputs:
            spec = INPUTS[name]
            shape = (batch, lengths[spec.tokens])
            if spec.fill is not None:
                values[name] = torch.full(shape, spec.fill, dtype=torch.long, device=device)
            elif device.type == "meta":
                values[name] = torch.ones(shape, dtype=torch.long, device=device)
            else:
                values[name] = torch.randint(1, max(2, vocab), shape, device=device)
        return values

    def dynamic_shapes(self, max_batch: int, max_seq: int) -> dict:
        """Dynamic batch and sequence length of every input (the decoder's sequence its own).
        DYNAMIC hints, not named Dims: torch 2.11 cannot prove some stride guards such as
        min(16*seq, 32*seq) == 16*seq, which named Dims turn into hard errors."""
        return {name: {0: Dim.DYNAMIC(min=1, max=max_batch), 1: Dim.DYNAMIC(min=1, max=max_seq)}
                for name in self.inputs}


class Forward(torch.nn.Module):
    """The model as a function of the signature's inputs -> its first output, without a KV cache.
    The attribute is named `model`, so state names read "model.<HF name>"."""

    def __init__(self, model: torch.nn.Module, signature: Signature):
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, decoder_input_ids=None,
                decoder_attention_mask=None):  # every name of INPUTS, in its order: export names inputs so
        given = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask)
        kwargs = {name: given[name] for name in self.signature.inputs}
        if self.signature.use_cache is not None:
            kwargs["use_cache"] = self.signature.use_cache
        return self.model(**kwargs)[0]


def _is_encoder(model: torch.nn.Module) -> bool:
    config = model.config
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False) \
        and not getattr(config, "is_encoder_decoder", False)


def signature_of(model) -> Signature:
    """The signature `model` is captured with; a TypeError says what is supported otherwise."""
    supported = ("fxtp.compile supports HF causal LMs (AutoModelForCausalLM), encoder-decoder LMs "
                 "(AutoModelForSeq2SeqLM) and encoders (AutoModel, AutoModelForMaskedLM, "
                 "AutoModelForSequenceClassification of BERT-like model types)")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxtp.compile expects a torch.nn.Module (a HF model), got {type(model).__name__}. {supported}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise TypeError(f"{type(model).__name__} has no HF config. {supported}")
    if getattr(config, "is_encoder_decoder", False):
        return Signature(SEQ2SEQ, ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"))
    if _is_encoder(model):
        # token types of zeros are what no token types mean only with a vocabulary of types (BERT's);
        # XLM adds its word embedding of each type id when given any, so it gets none
        takes_types = "token_type_ids" in inspect.signature(model.forward).parameters and \
            getattr(config, "type_vocab_size", None) is not None
        return Signature(ENCODER, ("input_ids", "attention_mask") + (("token_type_ids",) if takes_types else ()),
                         use_cache=None)
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        return Signature(CAUSAL_LM, ("input_ids", "attention_mask"))
    raise TypeError(f"{type(model).__name__} ({config.model_type}) has no language-model head and is not an "
                    f"encoder or encoder-decoder model. {supported}; load a decoder-only model with "
                    "AutoModelForCausalLM.from_config/from_pretrained.")


# config sizes of chunked scans that pad the sequence to whole chunks (Mamba-2 and its hybrids)
SCAN_CHUNK_KEYS = ("chunk_size", "mamba_chunk_size")


def example_length(config, wanted: int) -> int:
    """`wanted`, or the next length that no scan chunk size of `config` divides. A chunked scan cuts
    the padding off again under `if pad_size > 0`, which export decides for the example: from a length
    that a chunk divides it would capture no cut, and the program would refuse every other length."""
    chunks = [size for key in SCAN_CHUNK_KEYS if isinstance(size := getattr(config, key, None), int) and size > 1]
    length = wanted
    while any(length % size == 0 for size in chunks):
        length += 1
    return length
