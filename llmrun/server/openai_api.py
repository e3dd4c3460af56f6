"""OpenAI's endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Requests are checked field by field (params.py) and turned into the Python API's CompletionOptions, so the
server takes every parameter `Llama.create_completion` / `create_chat_completion` take, with their defaults.
Streams are Server-Sent Events as OpenAI sends them: `data: {chunk}` lines, a last chunk with the usage when
`stream_options.include_usage`, then `data: [DONE]`.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..api import Llama
from ..completion_options import CompletionOptions
from ..errors import LlmrunError
from .errors import RequestError
from .params import Fields, read_json
from .runs import Run
from .state import ServerState, until_disconnect

OPTION_NAMES = {f.name for f in dataclasses.fields(CompletionOptions)}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_PROMPTS = 16


def _api_defaults(method) -> dict[str, Any]:
    """The defaults of a Llama method's completion keywords (the server's defaults are the API's)."""
    return {name: p.default for name, p in inspect.signature(method).parameters.items() if name in OPTION_NAMES}


CHAT_DEFAULTS = _api_defaults(Llama.create_chat_completion)
COMPLETION_DEFAULTS = _api_defaults(Llama.create_completion)


# ---- request fields -> CompletionOptions -----------------------------------------------------------------
def completion_options(f: Fields, defaults: dict, state: ServerState) -> CompletionOptions:
    """The sampling and stopping fields every generation endpoint shares (OpenAI names plus llama.cpp's)."""
    limit = state.config.max_tokens or state.host.n_ctx
    max_tokens = f.integer("max_completion_tokens", None, lo=1, hi=limit)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, lo=1, hi=limit)
    kw = dict(defaults)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    elif defaults.get("max_tokens") is None:
        kw["max_tokens"] = None
    kw.update({k: v for k, v in {
        "temperature": f.number("temperature", None, lo=0, hi=100),
        "top_p": f.number("top_p", None, lo=0, hi=1),
        "top_k": f.integer("top_k", None, lo=0, hi=1 << 20),
        "min_p": f.number("min_p", None, lo=0, hi=1),
        "repeat_penalty": f.number("repeat_penalty", None, lo=1e-3, hi=100),
        "repeat_last_n": f.integer("repeat_last_n", None, lo=-1, hi=1 << 20),
        "frequency_penalty": f.number("frequency_penalty", None, lo=-2, hi=2),
        "presence_penalty": f.number("presence_penalty", None, lo=-2, hi=2),
        "seed": f.integer("seed", None, lo=-(1 << 63), hi=(1 << 64) - 1),
        "stop": f.stop("stop"),
    }.items() if v is not None})
    if kw.get("seed") is not None and kw["seed"] < 0:
        kw["seed"] = None                       # -1: random, as llama.cpp
    kw["stream"] = False                        # the server streams itself
    kw.update(passthrough_options(f))
    return CompletionOptions(**kw)


# Fields OpenAI defines that the Python API may take (when it does, they go through unchanged), with the
# values that mean "off" (accepted even when the API does not take the field).
PASSTHROUGH = {"response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none", "auto"),
               "logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "grammar": ("",),
               "parallel_tool_calls": (True, False)}


def passthrough_options(f: Fields) -> dict[str, Any]:
    out = {}
    for name, off in PASSTHROUGH.items():
        value = f.raw(name)
        if value is None:
            continue
        if name in OPTION_NAMES:
            out[name] = value                   # the API checks it (LlmrunError -> 400)
        elif not any(value == o and type(value) is type(o) for o in off):
            raise RequestError(f"'{name}' is not supported by this server yet", param=name,
                               code="unsupported_parameter")
    return out


def choice_count(f: Fields, state: ServerState) -> int:
    n = f.integer("n", 1, lo=1, hi=state.config.max_n)
    best_of = f.integer("best_of", None, lo=1)
    if best_of is not None and best_of != n:
        raise RequestError("'best_of' other than n is not supported", param="best_of")
    return n


def chat_messages(value: Any) -> list[dict]:
    """OpenAI messages -> what the chat template reads: role, content (text, or text parts), and the
    tool-call fields as given."""
    if not isinstance(value, list) or not value:
        raise RequestError("'messages' must be a non-empty array of messages", param="messages")
    out = []
    for i, m in enumerate(value):
        f = Fields(m, f"messages[{i}].")
        role = f.string("role", required=True)
        if role not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pf = Fields(part, f"messages[{i}].content[{j}].")
                kind = pf.string("type", required=True)
                if kind != "text":
                    raise RequestError(f"'messages[{i}].content[{j}]': content of type {kind!r} is not supported "
                                       f"(text only)", param=f"messages[{i}].content")
                parts.append(pf.string("text", required=True))
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"'messages[{i}].content' must be a string or an array of text parts",
                               param=f"messages[{i}].content")
        msg = {"role": "system" if role == "developer" else role, "content": content or ""}
        for key in ("name", "tool_call_id"):
            if key in f:
                msg[key] = f.string(key)
        if "tool_calls" in f:
            msg["tool_calls"] = f.array("tool_calls")
        out.append(msg)
    return out


# ---- routes ------------------------------------------------------------------------------------------------
async def list_models(request: Request) -> Response:
    info = ServerState.of(request).host.info
    return JSONResponse({"object": "list", "data": [_model_card(info)]})


async def get_model(request: Request) -> Response:
    info = ServerState.of(request).host.info
    if request.path_params["model"] != info.name:
        raise RequestError(f"the model '{request.path_params['model']}' does not exist (this server has "
                           f"'{info.name}')", 404, param="model", code="model_not_found")
    return JSONResponse(_model_card(info))


def _model_card(info) -> dict:
    return {"id": info.name, "object": "model", "created": int(info.modified), "owned_by": "llmrun",
            "meta": {"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train, "n_params": info.n_params,
                     "n_vocab": info.n_vocab, "file_type": info.file_type, "size": info.size}}


async def chat_completions(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    messages = chat_messages(f.raw("messages"))
    options = completion_options(f, CHAT_DEFAULTS, state)
    n = choice_count(f, state)
    stream, include_usage = _stream_flags(f)
    tokens = await _tokens(state.host.chat_tokens, messages)
    run = Run(state.host, state.scheduler, [tokens], options, n)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.host.name

    def chunk(choices, usage=None):
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": state.fingerprint, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return out

    if stream:
        async def chunks():
            for c in run.choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for c, ev in run.events():
                if ev.text:
                    yield chunk([{"index": c.index, "delta": {"content": ev.text}, "logprobs": None,
                                  "finish_reason": None}])
                if ev.finish_reason is not None:
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                                  "finish_reason": ev.finish_reason}])
            if include_usage:
                yield chunk([], run.usage())
        return sse_response(chunks(), run)

    choices = await until_disconnect(request, run, run.finish())
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": state.fingerprint,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason} for c in choices],
        "usage": run.usage()})


async def completions(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    prompts = _completion_prompts(f.raw("prompt"), state)
    options = completion_options(f, COMPLETION_DEFAULTS, state)
    n = choice_count(f, state)
    if len(prompts) * n > state.config.max_n * 2:
        raise RequestError(f"at most {state.config.max_n * 2} choices (prompts x n) per request", param="n")
    if f.string("suffix"):
        raise RequestError("'suffix' (fill in the middle) is not supported", param="suffix")
    echo = f.boolean("echo", False)
    stream, include_usage = _stream_flags(f)
    token_lists = [await _tokens(state.host.prompt_tokens, p) for p in prompts]
    run = Run(state.host, state.scheduler, token_lists, options, n)
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.host.name
    echoed = [(p if isinstance(p, str) else state.host.llm.detokenize(p).decode("utf-8", "replace"))
              if echo else "" for p in prompts]

    def body(choices, usage=None):
        out = {"id": cid, "object": "text_completion", "created": created, "model": model,
               "system_fingerprint": state.fingerprint, "choices": choices}
        if usage is not None or include_usage:
            out["usage"] = usage
        return out

    if stream:
        async def chunks():
            started = set()
            async for c, ev in run.events():
                text = ev.text
                if c.index not in started:
                    started.add(c.index)
                    text = echoed[c.prompt_index] + text
                if text or ev.finish_reason is not None:
                    yield body([{"text": text, "index": c.index, "logprobs": None,
                                 "finish_reason": ev.finish_reason}])
            if include_usage:
                yield body([], run.usage())
        return sse_response(chunks(), run)

    choices = await until_disconnect(request, run, run.finish())
    return JSONResponse(body([{"text": echoed[c.prompt_index] + c.text, "index": c.index, "logprobs": None,
                               "finish_reason": c.finish_reason} for c in choices], run.usage()))


async def embeddings(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    inputs = f.raw("input")
    if inputs is None:
        raise RequestError("'input' is required", param="input")
    if f.string("encoding_format", "float") != "float":
        raise RequestError("'encoding_format' must be \"float\"", param="encoding_format")
    result = await state.embed(inputs)
    result["model"] = state.host.name
    return JSONResponse(result)


# ---- helpers -----------------------------------------------------------------------------------------------
def _stream_flags(f: Fields) -> tuple[bool, bool]:
    stream = f.boolean("stream", False)
    opts = Fields(f.object("stream_options") or {}, "stream_options.")
    return stream, bool(stream and opts.boolean("include_usage", False))


def _completion_prompts(value: Any, state: ServerState) -> list:
    """A string, a list of strings, a list of token ids or a list of such lists -> one entry per prompt."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [_token_ids(value, state)]
        if all(isinstance(p, str) for p in value) and len(value) <= MAX_PROMPTS:
            return list(value)
        if all(isinstance(p, list) and p for p in value) and len(value) <= MAX_PROMPTS:
            return [_token_ids(p, state) for p in value]
    raise RequestError(f"'prompt' must be a string, a list of token ids, or a list of at most {MAX_PROMPTS} of "
                       f"either", param="prompt")


def _token_ids(ids: list, state: ServerState) -> list[int]:
    n_vocab = state.host.info.n_vocab
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in ids):
        raise RequestError(f"token ids in 'prompt' must be integers from 0 to {n_vocab - 1}", param="prompt")
    return list(ids)


async def _tokens(fn, arg) -> list[int]:
    """Tokenize (or render a chat template) off the event loop; a template's refusal is the client's 400."""
    try:
        return await run_in_threadpool(fn, arg)
    except RecursionError:
        raise RequestError("the request is nested too deeply to render") from None
    except LlmrunError as e:
        raise RequestError(str(e)) from None


def sse_response(chunks: AsyncIterator[dict], run: Run) -> StreamingResponse:
    """Server-Sent Events: one `data:` line per chunk, then `data: [DONE]`. A fault after the stream began is
    sent as an error object (the status line is gone by then). Closing the stream cancels the run."""
    async def body():
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False, separators=(',', ':'))}\n\n"
        except RequestError as e:
            yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                                   "code": e.code}}) + "\n\n"
        finally:
            run.cancel()
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
