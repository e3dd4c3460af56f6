"""Errors users see. Every one of these is printed by the CLI as a single line, never a traceback."""


class LlmrunError(Exception):
    """Base class: a problem with the user's input or environment, described in one line."""

    def __str__(self) -> str:
        # messages quote inputs (paths, names, template errors) that may hold line breaks: still one line
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text


class GGUFError(LlmrunError):
    """A GGUF file is malformed, truncated, or uses something we do not support."""


class QuantError(LlmrunError):
    """A tensor cannot be (de)quantized to the requested type."""


class TokenizerError(LlmrunError):
    """A vocabulary is missing or unsupported."""


class ModelError(LlmrunError):
    """A model file cannot be run (unsupported architecture, missing tensors, bad hyper-parameters)."""


class ConvertError(LlmrunError):
    """A Hugging Face checkpoint or LoRA adapter cannot be converted."""


class ContextFullError(LlmrunError):
    """The context window has no room for more tokens."""


class GrammarError(LlmrunError):
    """A grammar, JSON schema or response_format cannot be compiled, or generation left the grammar."""


class ToolCallError(LlmrunError):
    """``tools`` or ``tool_choice`` is malformed."""


class EmbeddingError(LlmrunError):
    """Embeddings cannot be computed as asked."""


class AdapterError(LlmrunError):
    """A LoRA adapter cannot be applied to the loaded model (wrong base, ranks, shapes or file)."""


class ChatTemplateError(LlmrunError):
    """A chat template cannot be compiled, refuses the conversation, or exceeds its render budget."""


class InvalidArgumentError(LlmrunError, ValueError):
    """An argument of a Python API call has the right type but an impossible value (a token id outside the
    vocabulary, a NaN, a context size larger than memory)."""


class ArgumentTypeError(LlmrunError, TypeError):
    """An argument of a Python API call has the wrong type (a string where an integer belongs, ...)."""


def is_library_failure(e: BaseException) -> bool:
    """True for what a third-party library raises on bad input: any Exception, and a Rust panic surfacing as
    pyo3's PanicException (HF tokenizers), which derives from BaseException so `except Exception` misses it.
    Use as `except BaseException as e: if not is_library_failure(e): raise`."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if empty), cut to `limit` characters."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "…"
