"""The embedding one rank computes from its vocab shard (Megatron's VocabParallelEmbedding).

Rank r holds rows [vocab_start, vocab_start + len(weight)) of the table. Ids it does not own
look up row 0 and are zeroed, so every id is non-zero on exactly one rank and the sum over
ranks (one all_reduce) is the full embedding, exactly. Rank graphs call it as one
call_function node, so all ranks keep the same graph shape and torch.compile traces it.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, vocab_start: int, vocab_size: int,
                             padding_idx: int = -1, scale_grad_by_freq: bool = False, sparse: bool = False) -> torch.Tensor:
    """embedding(weight, ids) for the ids this shard owns, zeros for the others. `padding_idx`
    is local to the shard (-1 when the global padding row is on another rank). An id outside
    [0, vocab_size) is owned by no rank and would become a zero vector, a plausible wrong answer, so it
    raises as HF's embedding does (checked_ids)."""
    checked_ids(ids, vocab_size)
    local = ids - vocab_start
    outside = (local < 0) | (local >= weight.shape[0])
    out = aten.embedding.default(weight, local.masked_fill(outside, 0), padding_idx, scale_grad_by_freq, sparse)
    return out.masked_fill(outside.unsqueeze(-1), 0)


def checked_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """IndexError unless every id is in [0, vocab_size). Eagerly on the host; in a compiled step (inductor,
    CUDA graphs) a device-side assert, which needs no host sync: the step stops with a CUDA error."""
    if torch.compiler.is_compiling() or ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), f"token ids must be in [0, {vocab_size})")
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)].unique()[:5].tolist()
        raise IndexError(f"token ids {bad} are outside the vocabulary [0, {vocab_size}): the tokenizer does not "
                         "match the model (or the ids are not token ids)")


def local_padding_idx(padding_idx: int, vocab_start: int, vocab_rows: int) -> int:
    """The shard's row of the global padding row, or -1 when another rank holds it."""
    local = padding_idx - vocab_start
    return local if padding_idx >= 0 and 0 <= local < vocab_rows else -1
