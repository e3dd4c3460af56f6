"""Errors users see. Every one of these is printed by the CLI as a single line, never a traceback."""


class LlmrunError(Exception):
    """Base class: a problem with the user's input or environment, described in one line."""


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
