"""The OpenAI-shaped results of `Llama.create_completion` / `create_chat_completion`, as TypedDicts.

Names follow llama-cpp-python's `llama_types` (Completion, CompletionChunk, ChatCompletion,
ChatCompletionChunk, ...), so code typed against it reads the same here. They are plain dicts at run time.
"""
from __future__ import annotations

from typing import Literal, TypedDict

# "cancelled": `Llama.cancel()` stopped the generation (llmrun's addition to OpenAI's reasons).
FinishReason = Literal["stop", "length", "cancelled"]


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: None
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


class ChatCompletionMessage(TypedDict):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(TypedDict):
    index: int
    message: ChatCompletionMessage
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatCompletionChunkDelta(TypedDict, total=False):
    """First chunk: {"role": "assistant"}; then {"content": text}; the last one: {}."""
    role: Literal["assistant"]
    content: str


class ChatCompletionChunkChoice(TypedDict):
    index: int
    delta: ChatCompletionChunkDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
