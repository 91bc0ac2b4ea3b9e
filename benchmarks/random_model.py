"""The model every impl of inference_test.py loads, and its prompts: a config by shape name, its
seeded random weights saved once as a HF checkpoint, and seeded random prompts by batch size."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from decode_impls import free_memory  # benchmarks/, beside this script
from fxtp.tiny_configs import real_config, tiny_config
from process_group import barrier


def model_config(shape: str, layers: int | None):
    if shape.startswith("tiny:"):
        return tiny_config(shape[5:], **({"layers": layers} if layers else {}))
    return real_config(shape, layers)


def ensure_checkpoint(args, config, dtype: torch.dtype, device: torch.device) -> str:
    """The seeded random-weight model as a HF checkpoint, written once by rank 0 and kept for later runs."""
    name = f"{args.shape.replace(':', '-')}-L{config.num_hidden_layers}-{args.dtype}-seed{args.seed}"
    path = args.checkpoint_dir or os.path.join(tempfile.gettempdir(), "fxtp_bench", name)
    complete = os.path.join(path, "COMPLETE")
    if dist.get_rank() == 0 and not os.path.exists(complete):
        torch.manual_seed(args.seed)
        with device:  # HF's random init is much faster on a GPU; every impl then loads the same file
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(path)
        open(complete, "w").close()
        del model
        free_memory(device)
    barrier(device)
    return path


def make_prompt(batch: int, length: int, vocab: int, seed: int, device: torch.device):
    generator = torch.Generator().manual_seed(seed * 100003 + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)  # 0-2: pad/bos/eos in tiny configs
    return ids.to(device), torch.ones_like(ids).to(device)
