"""The OpenAI-shaped results of `Llama.create_completion` / `create_chat_completion`, as TypedDicts.

Names follow llama-cpp-python's `llama_types` (Completion, CompletionChunk, ChatCompletion,
ChatCompletionChunk, ...), so code typed against it reads the same here. They are plain dicts at run time.
"""
from __future__ import annotations

from typing import Any, Literal, TypedDict

# "cancelled": `Llama.cancel()` stopped the generation (llmrun's addition to OpenAI's reasons).
# "tool_calls": the message is tool calls (chat with tools).
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(TypedDict):
    """llama-cpp-python's `logprobs=N` result: per token its text, character offset, log-probability and
    the top N alternatives (text -> log-probability); None for the first echoed prompt token."""
    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(TypedDict):
    """One piece of a streamed text completion; the last one carries the finish reason and no text."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]


class Completion(CompletionChunk):
    usage: CompletionUsage


class ChatCompletionTokenLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]]     # [{"token", "logprob", "bytes"}], most likely first


class ChatCompletionLogprobs(TypedDict):
    content: list[ChatCompletionTokenLogprob]
    refusal: None


class ChatCompletionFunctionCall(TypedDict):
    name: str
    arguments: str                         # JSON text, as OpenAI sends it


class ChatCompletionMessageToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: ChatCompletionFunctionCall


class ChatCompletionMessage(TypedDict, total=False):
    role: Literal["assistant"]
    content: str | None                    # None when the message is only tool calls
    tool_calls: list[ChatCompletionMessageToolCall]


class ChatCompletionChoice(TypedDict):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatCompletionChunkDelta(TypedDict, total=False):
    """First chunk: {"role": "assistant"}; then {"content": text} (or {"tool_calls": [...]}, each with its
    "index"); the last one: {}."""
    role: Literal["assistant"]
    content: str
    tool_calls: list[dict[str, Any]]


class ChatCompletionChunkChoice(TypedDict):
    index: int
    delta: ChatCompletionChunkDelta
    logprobs: ChatCompletionLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]


class Embedding(TypedDict):
    object: Literal["embedding"]
    embedding: list[float] | list[list[float]]   # per token with pooling "none"
    index: int


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
