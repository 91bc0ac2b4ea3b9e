"""fxtp: automatic tensor parallelism for HuggingFace transformers, as a torch.fx compiler."""
from fxtp.capture import CaptureError
from fxtp.dump import dump
from fxtp.generation import Generator
from fxtp.layouts import Partial, Replicate, Shard
from fxtp.program import TPProgram, compile

__all__ = ["compile", "dump", "TPProgram", "Generator", "CaptureError", "Replicate", "Shard", "Partial"]
