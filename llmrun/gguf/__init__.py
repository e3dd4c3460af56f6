"""GGUF v3 container: memory-mapped reader, streaming atomic writer.

The container never dequantizes (it does not import the codecs). `read_tensor(path, name)` is a convenience
re-export of llmrun.tensors.read_tensor, imported on first use.
"""
from ..ggml import GGMLType, row_nbytes
from .constants import GGUFValueType, LlamaFileType
from .reader import GGUFReader, TensorInfo
from .writer import GGUFWriter


def __getattr__(name):
    if name == "read_tensor":   # lazy: llmrun.tensors sits above the container and imports the codecs
        from ..tensors import read_tensor
        return read_tensor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["GGMLType", "GGUFValueType", "LlamaFileType", "row_nbytes",
           "GGUFReader", "TensorInfo", "read_tensor", "GGUFWriter"]
