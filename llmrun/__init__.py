"""llmrun: run LLaMA-family GGUF models on the CPU, in Python."""
__version__ = "0.1.0"

from .cpu_target import prefer_wide_vectors as _prefer_wide_vectors
from .errors import LlmrunError

_prefer_wide_vectors()   # before numba starts: see cpu_target.py


def __getattr__(name):
    # Lazy so that `import llmrun.gguf` does not pay for numba/jinja imports.
    if name == "Llama":
        from .api import Llama
        return Llama
    raise AttributeError(name)


__all__ = ["Llama", "LlmrunError", "__version__"]
