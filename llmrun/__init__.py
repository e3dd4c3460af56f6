"""llmrun: run LLaMA-family GGUF models on the CPU, in Python."""
__version__ = "0.1.0"

from . import runtime as _runtime
from .errors import LlmrunError

_runtime.configure_before_numba()   # first, before anything imports numba: see runtime.py


def __getattr__(name):
    # Lazy so that `import llmrun.gguf` does not pay for numba/jinja imports.
    if name == "Llama":
        from .api import Llama
        return Llama
    if name == "LlamaGrammar":          # llama-cpp-python's name for a compiled grammar
        from .text.grammar import Grammar
        return Grammar
    raise AttributeError(name)


__all__ = ["Llama", "LlamaGrammar", "LlmrunError", "__version__"]
