"""What a decode step cannot go below, for inference_test.py's derived columns: the bytes it reads
at peak HBM bandwidth, plus its all_reduces timed alone (inference_test.py's docstring gives the
formulas)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from fxtp.capture.static_cache import cache_shape
from fxtp.decode.symmetric_memory import symmetric_memory_works
from kernel_timing import as_cuda_graph, synchronizer, time_ms  # benchmarks/, beside this script

HBM_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12))  # B/s


@dataclass(frozen=True)
class ModelStats:
    weights: int  # parameters a decode step reads: all but an untied input embedding
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, config) -> "ModelStats":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embedding
        text = config.get_text_config(decoder=True)
        _, kv_heads, _, head_dim = cache_shape(config, 1, 1)  # as fxtp's static cache holds them
        return cls(weights=sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel()),
                   layers=text.num_hidden_layers, kv_heads=kv_heads, head_dim=head_dim, hidden=text.hidden_size)

    def decode_bytes(self, batch: int, context: float, ranks: int, dtype_bytes: int) -> float:
        """Bytes one decode step reads on each of `ranks` ranks, ideally split."""
        kv_local = self.kv_heads // ranks if self.kv_heads % ranks == 0 else self.kv_heads
        kv = 2 * self.layers * kv_local * self.head_dim * context * batch
        return (self.weights / ranks + kv) * dtype_bytes


def hbm_bandwidth(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((bandwidth for key, bandwidth in HBM_BANDWIDTH if key in name), None)


def allreduce_ms(batch: int, stats: ModelStats, dtype: torch.dtype, device: torch.device, reps: int = 20) -> dict:
    """Time of one decode step's all_reduces ([batch, hidden], 2 per layer + the embedding's), back to
    back, by implementation: {"nccl": ms, "one_shot": ms, "push": ms} on CUDA (replays of a CUDA graph
    holding them; one_shot and fxtp's push where symmetric memory works), {"gloo": ms} on the CPU."""
    calls, group_name = 2 * stats.layers + 1, dist.group.WORLD.group_name
    x = torch.zeros(batch, stats.hidden, dtype=dtype, device=device)
    back_to_back = lambda: [dist.all_reduce(x) for _ in range(calls)]  # noqa: E731
    if device.type != "cuda":
        return {"gloo": time_ms(back_to_back, reps, synchronizer(device))}
    steps = {"nccl": back_to_back}
    if symmetric_memory_works(group_name, device):
        import torch.distributed._symmetric_memory as symm_mem

        buffer = symm_mem.empty(batch, stats.hidden, dtype=dtype, device=device)
        symm_mem.rendezvous(buffer, group_name)
        steps["one_shot"] = lambda: [torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group_name)
                                     for _ in range(calls)]
        steps["push"] = lambda: [torch.ops.fxtp.push_all_reduce(x, group_name) for _ in range(calls)]
    return {name: time_ms(as_cuda_graph(step), reps, synchronizer(device)) for name, step in steps.items()}


def derived(row: dict, stats: ModelStats, args, dtype: torch.dtype, bandwidth: float | None) -> dict:
    latency_ms = row["decode_ms"]["p50"]
    read = stats.decode_bytes(row["batch"], args.prompt_len + args.gen_len / 2, row["world_size"],
                              torch.finfo(dtype).bits // 8)
    hbm_ms = read / bandwidth * 1e3 if bandwidth else None
    floor_ms = hbm_ms + (row["ar_ms"] or 0) if hbm_ms else None
    return {"decode_bytes_per_rank": read, "gb_per_s": read / latency_ms / 1e6,
            "tflops": 2 * stats.weights * row["batch"] / latency_ms / 1e9,
            "hbm_floor_ms": hbm_ms, "hbm_fraction": hbm_ms / latency_ms if hbm_ms else None,
            "floor_ms": floor_ms, "x_floor": latency_ms / floor_ms if floor_ms else None}
