"""The KV cache that HF's generate hands to an fxtp model between steps.

HF's loop keeps its cache object in `model_kwargs` and passes it to every forward. An fxtp model's
cache is the static one that its rank graphs hold as buffers (fxtp/capture/static_cache.py), sharded
on the kv heads. So the object HF passes around is a handle: how long the cache is, how many tokens
are in it, and which Generator's buffers it stands for. It subclasses DynamicCache so every check
that HF's loop makes on a cache finds the attributes it reads; its own layers stay empty.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicCache


class CacheTakenOver(RuntimeError):
    """A generation's cache was overwritten by a later one on the same fxtp model."""


class ShardedCache(DynamicCache):
    """`max_length` tokens of static KV cache, held by `generator`'s rank graphs; `seen` of them are
    filled. The buffers belong to the last cache that started on the generator: the Generator holds
    one cache at a time, so an older handle used after a newer one started raises CacheTakenOver."""

    def __init__(self, config, generator, max_length: int):
        super().__init__(config=config)
        self.generator, self.max_length, self.seen = generator, max_length, 0

    def get_seq_length(self, layer_idx: Optional[int] = 0) -> int:
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def claim(self) -> None:
        """Make this cache the generator's current one (at its first step), or check that it still is."""
        if self.seen == 0:
            self.generator.current_cache = self
        elif self.generator.current_cache is not self:
            raise CacheTakenOver(
                "this KV cache was overwritten by a later generate() or forward on the same fxtp model: an "
                "fxtp model holds one KV cache at a time, so finish one generation before starting another")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.claim()
        self.generator.reorder_cache(beam_idx)

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"{what} is not supported by fxtp's sharded KV cache (it is static and lives in the rank graphs); "
            "use greedy search, sampling or beam search, without an assistant model or prompt lookup")

    def crop(self, max_length: int):
        self._unsupported("cropping the cache (assisted or prompt-lookup decoding)")

    def batch_repeat_interleave(self, repeats: int):
        self._unsupported("repeating the cache's rows")

    def batch_select_indices(self, indices: torch.Tensor):
        self._unsupported("selecting the cache's rows")
