"""GGUF v3 container: memory-mapped reader, streaming atomic writer."""
from ..ggml import GGMLType, row_nbytes
from .constants import GGUFValueType, LlamaFileType
from .reader import GGUFReader, TensorInfo, read_tensor
from .writer import GGUFWriter

__all__ = ["GGMLType", "GGUFValueType", "LlamaFileType", "row_nbytes",
           "GGUFReader", "TensorInfo", "read_tensor", "GGUFWriter"]
