"""fxtp: automatic tensor parallelism for HuggingFace transformers, as a torch.fx compiler."""
from fxtp.capture.export import CaptureError
from fxtp.decode.options import DecodeOptions
from fxtp.dump import dump
from fxtp.runtime.generation import Generator
from fxtp.sharding.layouts import Partial, Replicate, Shard
from fxtp.runtime.parallelize import parallelize
from fxtp.runtime.program import TPProgram, compile

__all__ = ["compile", "parallelize", "dump", "TPProgram", "Generator", "DecodeOptions", "CaptureError", "Replicate", "Shard", "Partial"]
