"""fxtp: automatic tensor parallelism for HuggingFace transformers, as a torch.fx compiler."""
from fxtp.dump import dump
from fxtp.layouts import Partial, Replicate, Shard
from fxtp.program import TPProgram, compile

__all__ = ["compile", "dump", "TPProgram", "Replicate", "Shard", "Partial"]
