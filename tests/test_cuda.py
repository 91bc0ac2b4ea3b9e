"""Compiled decode on real GPUs (fxtp/decode_graph.py): the CUDA-graph replay of a step with NCCL or
symmetric-memory all_reduce gives HF's greedy tokens. Skipped on machines with fewer than 2 GPUs;
run on a GPU machine with `python -m pytest -q tests/test_cuda.py`."""
import pytest
import torch

import fxtp
from fxtp.configs import tiny_model
from fxtp.launch import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

NEW_TOKENS = 12


def prompts(vocab: int, batch: int):
    ids = torch.randint(3, vocab, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, :4] = 0  # left padding
    return ids, mask


def compiled_generate_on_rank(rank, batches, compile):
    """Rank body: the compiled generator's greedy tokens for each prompt batch, twice (the second
    request replays the captured graph), and the options it chose."""
    device = torch.device("cuda", rank)
    generator = fxtp.compile(tiny_model("llama"), 2).generator(rank, device=device, compile=compile)
    tokens = [[generator.generate(ids.to(device), mask.to(device), max_new_tokens=NEW_TOKENS, eos_token_id=[]).cpu()
               for _ in range(2)] for ids, mask in batches]
    return tokens, generator.compile_options


@pytest.mark.parametrize("compile", [True, {"_collective.auto_select": False}], ids=["default", "nccl"])
def test_compiled_decode_on_two_gpus_generates_like_hf(compile):
    model = tiny_model("llama")
    batches = [prompts(model.config.vocab_size, batch) for batch in (1, 3)]  # batch 1: matmuls become reductions
    expected = [model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0) for ids, mask in batches]
    results = run_ranks(compiled_generate_on_rank, 2, batches, compile, timeout=900, backend="nccl")
    for tokens, options in results:
        assert options["coordinate_descent_tuning"] is True
        if compile is not True:
            assert options["_collective.auto_select"] is False
        for (first, second), reference in zip(tokens, expected):
            assert torch.equal(first, reference) and torch.equal(second, reference)
    assert results[0][0][0][0].shape == (1, 9 + NEW_TOKENS)
