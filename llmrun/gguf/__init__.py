"""GGUF v3 container: memory-mapped reader, streaming atomic writer."""
from .constants import GGMLType, GGUFValueType, LlamaFileType, row_nbytes
from .reader import GGUFReader, TensorInfo, read_tensor
from .writer import GGUFWriter

__all__ = ["GGMLType", "GGUFValueType", "LlamaFileType", "row_nbytes",
           "GGUFReader", "TensorInfo", "read_tensor", "GGUFWriter"]
