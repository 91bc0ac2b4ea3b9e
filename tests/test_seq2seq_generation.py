"""Encoder-decoder generation (fxtp/capture/seq2seq_cache.py): the encoder once, decoder steps with a
sharded static self-attention cache, greedy tokens equal to HF `generate`."""
from functools import lru_cache

import pytest
import torch

import fxtp
from fxtp.tiny_configs import tiny_model
from fxtp.sharding.layouts import Shard
from fxtp.node_meta import LAYOUT
from fxtp.capture.static_cache import CACHE_PREFIX
from fxtp.testing import assert_generates_like_hf, tiny_program


def right_padded(vocab: int, batch: int = 2, seq: int = 9, padding: int = 3):
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[-1, seq - padding:] = 0
    return ids, mask


@lru_cache(maxsize=None)
def varied_model(arch: str) -> torch.nn.Module:
    """The tiny model with seeded noise on its weights: as initialized, its greedy tokens repeat
    one id (T5: the pad id, BART: eos); with this seed T5's rows differ and BART's second row
    stops at eos after one token (then padded) while its first ends with the forced eos."""
    model, g = tiny_model(arch), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return model


@pytest.mark.parametrize("arch, world_size", [("t5", 2), pytest.param("bart", 2, marks=pytest.mark.slow),
                                              pytest.param("t5", 1, marks=pytest.mark.slow),
                                              pytest.param("bart", 4, marks=pytest.mark.slow)])
def test_greedy_tokens_equal_hf_generate(arch, world_size):
    model = varied_model(arch)
    tp = fxtp.compile(model, world_size)
    assert_generates_like_hf(model, world_size, *right_padded(model.config.vocab_size), max_new_tokens=8, program=tp)


def test_encoder_runs_once_and_self_attention_cache_is_sharded(monkeypatch):
    model, tp = tiny_program("t5", 2)
    ids, mask = right_padded(model.config.vocab_size)
    generator = tp.generator(device="cpu")
    runs, run = [], generator._run
    monkeypatch.setattr(generator, "_run", lambda modules, args: runs.append(len(args)) or run(modules, args))
    greedy = generator.generate(ids, mask, max_new_tokens=3, eos_token_id=[])
    assert runs == [2, 4, 4, 4] and greedy.shape == (2, 4)  # encoder (ids, mask), then 3 decoder steps
    cached = tp.with_cache(batch_size=2, max_length=256)
    layouts = [n.meta[LAYOUT] for n in cached.graph.graph.nodes
               if n.op == "placeholder" and n.meta.get("fxtp.state", "").startswith(CACHE_PREFIX)]
    assert layouts and all(isinstance(l, Shard) and l.dim == 1 for l in layouts), layouts
