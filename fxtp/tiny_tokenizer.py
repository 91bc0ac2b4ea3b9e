"""A tokenizer for tiny models, made locally: nothing can be downloaded, and HF's pipelines need one.

A byte-level BPE trained in a fraction of a second on a few sentences, with the special tokens at the
ids fxtp.tiny_configs gives them (pad 0, bos 1, eos 2), and at most the tiny models' 256 words.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fxtp.tiny_configs import tiny_model

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3: the tiny configs' pad, bos and eos
CORPUS = (
    "DeepSpeed is a deep learning optimization library that makes distributed training easy.",
    "Tensor parallelism splits each layer's weights across devices and sums the partial results.",
    "The quick brown fox jumps over the lazy dog, and the dog sleeps in the sun all day long.",
    "Hello, my name is fxtp. I shard transformer models over many GPUs with one call.",
)


def tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` tokens, trained on CORPUS; pads on the left, as
    generation with a decoder-only model needs."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                        show_progress=False))
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
                                   padding_side="left")


def save_tiny_pretrained(arch: str, directory: str, seed: int = 0) -> str:
    """Save a tiny `arch` model (fxtp.tiny_configs.tiny_model) and tiny_tokenizer() to `directory`,
    so that `transformers.pipeline(task, model=directory)` loads them as it loads a hub model."""
    model = tiny_model(arch, seed=seed, noise=0.05)
    model.generation_config.pad_token_id = model.config.pad_token_id
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
