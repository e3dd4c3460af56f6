"""`Llama`'s OpenAI-shaped completions: `create_completion` (llama-cpp-python's text completion, also `__call__`)
and `create_chat_completion` (chat, tools, logprobs), whole or as chunks of a stream. They shape the generation
loop's events (api_generation.py) with results.py and tool_calls.py."""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import api_args as args
from .completion_options import CompletionOptions, takes_options
from .errors import LlmrunError
from .generate import Event
from .llama_types import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, CompletionUsage,
                          FinishReason)
from .results import ChoiceLog, chat_logprobs, completion_logprobs
from .text.grammar import Grammar
from .text.tool_calls import CallStream, check_tools, forced_call_schema, parse_tool_calls, resolve_tool_choice


def _collect(events: Iterable[tuple[int, Event]], n: int) -> list[ChoiceLog]:
    logs = [ChoiceLog() for _ in range(n)]
    for index, event in events:
        logs[index].add(event)
    return logs


def _usage(n_prompt: int, logs: Sequence[ChoiceLog]) -> CompletionUsage:
    n_gen = sum(log.usage["completion_tokens"] for log in logs if log.usage)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}


class CompletionMethods:
    """Mixed into `Llama` (api.py), whose tokenizer, name and generation plumbing (api_generation.py) these use."""

    @takes_options(omit=CompletionOptions.CHAT_ONLY)
    def create_completion(self, prompt: str | bytes | Sequence[int], options: CompletionOptions
                          ) -> Completion | Iterator[CompletionChunk]:
        """OpenAI-shaped text completion (dict), or an iterator of chunks with stream=True.

        The keywords are CompletionOptions' fields (see the signature). `max_tokens` None or <= 0 means
        "until end of generation or the context is full". `grammar` (GBNF text or a Grammar) or
        `response_format` constrain the text; `logprobs=N` adds llama-cpp-python's logprobs (the top N per
        token, log-softmax of the raw logits); `echo` puts the prompt in front, `suffix` after; `n` choices.
        """
        tokens = self._prompt_tokens(prompt)
        grammar = self._constraint(options)
        top_n = _logprobs_count(options.logprobs, "logprobs", self.n_vocab()) if options.logprobs is not None \
            and options.logprobs is not False else None
        prompt_text = self._echo_text(prompt, tokens)
        echo = prompt_text if options.echo else ""
        echo_logprobs = self._echo_logprobs(tokens, top_n) if options.echo and top_n is not None else []
        events = self._choices(tokens, options, grammar, top_n)
        cid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), options.model or self._name
        suffix = options.suffix or ""
        # offsets count characters from the start of the prompt, as OpenAI's (and llama-cpp-python's) do
        start = 0 if options.echo else len(prompt_text)

        def logprobs_of(entries, offset: int, prompt_part=()):
            return completion_logprobs(self.tokenizer, entries, text_offset=offset, prompt=prompt_part)

        def chunk(index: int, text: str, finish: FinishReason | None, logprobs=None) -> CompletionChunk:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]}

        if args.flag(options.stream, "stream"):
            def chunks() -> Iterator[CompletionChunk]:
                offsets: dict[int, int] = {}
                for index, event in events:
                    if index not in offsets:
                        offsets[index] = start
                        if echo:
                            yield chunk(index, echo, None,
                                        logprobs_of([], 0, echo_logprobs) if echo_logprobs else None)
                            offsets[index] = len(echo)
                    text = event.text + (suffix if event.finish_reason is not None else "")
                    logprobs = None
                    if event.logprob is not None:
                        logprobs = logprobs_of([event.logprob], offsets[index])
                        offsets[index] += len(logprobs["tokens"][0])
                    if text or logprobs:
                        yield chunk(index, text, None, logprobs)
                    if event.finish_reason is not None:
                        yield chunk(index, "", event.finish_reason)
            return chunks()
        logs = _collect(events, options.n)
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": echo + log.content + suffix, "index": i,
                             "logprobs": logprobs_of(log.logprobs, start, echo_logprobs) if top_n is not None
                             else None,
                             "finish_reason": log.finish_reason}
                            for i, log in enumerate(logs)],
                "usage": _usage(len(tokens), logs)}

    __call__ = create_completion

    @takes_options(omit=CompletionOptions.COMPLETION_ONLY, max_tokens=None, temperature=0.2, logprobs=False)
    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], options: CompletionOptions
                               ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """OpenAI-shaped chat completion using the model's chat template (ChatML if the file has none).

        The keywords are create_completion's, with other defaults for max_tokens and temperature, plus
        `tools` / `tool_choice` ("none", "auto", "required" or a named function: the output is then
        constrained to one call of it) and `logprobs=True` with `top_logprobs=N` (OpenAI's shape). Tool calls
        come back as `message.tool_calls` with finish_reason "tool_calls".
        """
        tools = check_tools(options.tools if options.tools is not None else options.functions)
        mode, forced = resolve_tool_choice(options.tool_choice if options.tool_choice is not None
                                           else options.function_call, tools)
        offered = tools if mode != "none" else []
        tokens = self.chat_tokens(messages, tools=offered or None)
        forced_grammar = Grammar.from_json_schema(forced_call_schema(tools, forced)) if mode == "required" else None
        grammar = self._constraint(options, forced_grammar)
        top_n = None
        if options.logprobs:
            top_n = _logprobs_count(options.top_logprobs or 0, "top_logprobs", self.n_vocab())
        events = self._choices(tokens, options, grammar, top_n)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), options.model or self._name

        def finish_of(reason, calls):
            return "tool_calls" if calls and reason == "stop" else reason

        if args.flag(options.stream, "stream"):
            def chunks() -> Iterator[ChatCompletionChunk]:
                def chunk(index, delta, finish, entries=None):
                    logprobs = chat_logprobs(self.tokenizer, entries) if entries else None
                    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}]}
                streams: dict[int, CallStream | None] = {}
                for index, event in events:
                    if index not in streams:
                        streams[index] = CallStream(offered) if offered else None
                        yield chunk(index, {"role": "assistant"}, None)
                    calls_stream = streams[index]
                    text = calls_stream.push(event.text) if calls_stream else event.text
                    entries = [event.logprob] if event.logprob is not None else []
                    if text or entries:
                        yield chunk(index, {"content": text}, None, entries)
                    if event.finish_reason is not None:
                        rest, calls = calls_stream.finish() if calls_stream else ("", [])
                        if rest:
                            yield chunk(index, {"content": rest}, None)
                        if calls:
                            yield chunk(index, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]},
                                        None)
                        yield chunk(index, {}, finish_of(event.finish_reason, calls))
            return chunks()

        logs = _collect(events, options.n)
        choices = []
        for i, log in enumerate(logs):
            content, calls = parse_tool_calls(log.content, offered) if offered else (log.content, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message,
                            "logprobs": chat_logprobs(self.tokenizer, log.logprobs) if top_n is not None else None,
                            "finish_reason": finish_of(log.finish_reason, calls)})
        return {"id": cid, "object": "chat.completion", "created": created, "model": name, "choices": choices,
                "usage": _usage(len(tokens), logs)}


def _logprobs_count(value, name: str, n_vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= n_vocab:
        raise LlmrunError(f"{name} must be an integer from 0 to {n_vocab}, got {value!r}")
    return int(value)
