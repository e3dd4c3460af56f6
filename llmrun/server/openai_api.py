"""OpenAI's endpoints: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

A request's fields are checked (params.py: types, ranges, the server's limits) and passed to the Python API's
own `create_chat_completion` / `create_completion` / `create_embedding`, so the server takes every parameter
they take (tools, response_format, grammar, logprobs, logit_bias, n, echo, suffix, ...) with their defaults,
and its results are theirs. Streams are Server-Sent Events as OpenAI sends them: `data: {chunk}` lines, with
`stream_options.include_usage` a last chunk with the usage, then `data: [DONE]`.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any, AsyncIterator, Iterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..completion_options import CompletionOptions
from .errors import RequestError
from .params import Fields, read_json
from .runs import Run
from .state import ServerState, iterate_in_thread

OPTION_NAMES = {f.name for f in dataclasses.fields(CompletionOptions)}
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
MAX_PROMPTS = 16
# Keywords the server sets itself, or that only Python callers can give (callables).
NOT_FROM_JSON = {"stream", "model", "logits_processor", "stopping_criteria"}


# ---- request fields -> the API's keywords --------------------------------------------------------------------
def api_keywords(f: Fields, state: ServerState, *, chat: bool) -> dict[str, Any]:
    """The completion keywords in a request: the sampling and stopping fields checked here (OpenAI's names and
    llama.cpp's), every other CompletionOptions field passed through for the API to check."""
    limit = state.config.max_tokens or state.host.n_ctx
    kw: dict[str, Any] = {}
    max_tokens = f.integer("max_completion_tokens", None, lo=1, hi=limit)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, lo=1, hi=limit)
    if max_tokens is not None:
        kw["max_tokens"] = max_tokens
    checked = {
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
        "n": f.integer("n", None, lo=1, hi=state.config.max_n),
        "top_logprobs": f.integer("top_logprobs", None, lo=0, hi=20),
        "logit_bias": _logit_bias(f, state),
        "response_format": f.object("response_format"),
        "suffix": f.string("suffix"),
        "grammar": f.string("grammar"),
    }
    kw.update({k: v for k, v in checked.items() if v is not None})
    other = CompletionOptions.COMPLETION_ONLY if chat else CompletionOptions.CHAT_ONLY
    for name in other:
        if name in kw or name in f:
            where = "/v1/completions" if chat else "/v1/chat/completions"
            raise RequestError(f"'{name}' applies to {where} only", param=name)
    if kw.get("seed") is not None and kw["seed"] < 0:
        kw.pop("seed")                          # -1: random, as llama.cpp
    if chat:
        if "logprobs" in f:
            kw["logprobs"] = f.boolean("logprobs")
        for name in ("tools", "functions"):
            if name in f:
                kw[name] = f.array(name)
        for name in ("tool_choice", "function_call"):
            if name in f:
                kw[name] = f.raw(name)
    else:
        if "logprobs" in f:
            kw["logprobs"] = f.integer("logprobs", lo=0, hi=20)
        if "echo" in f:
            kw["echo"] = f.boolean("echo")
    best_of = f.integer("best_of", None, lo=1)
    if best_of is not None and best_of != kw.get("n", 1):
        raise RequestError("'best_of' other than n is not supported", param="best_of")
    for name in OPTION_NAMES - NOT_FROM_JSON - set(kw) - set(other):
        if name in f and name not in checked:   # e.g. llama-cpp-python's typical_p, mirostat_*: the API checks
            kw[name] = f.raw(name)
    kw["model"] = state.host.name               # the name results carry (the request's is not checked)
    return kw


def _logit_bias(f: Fields, state: ServerState) -> dict | None:
    bias = f.object("logit_bias")
    if bias is None:
        return None
    n_vocab = state.host.info.n_vocab
    if len(bias) > 1024:
        raise RequestError("'logit_bias' may hold at most 1024 tokens", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not (key.lstrip("-").isdigit() and 0 <= int(key) < n_vocab):
            raise RequestError(f"'logit_bias' keys must be token ids from 0 to {n_vocab - 1}, got {key!r}",
                               param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise RequestError("'logit_bias' values must be numbers from -100 to 100", param="logit_bias")
        out[int(key)] = float(value)
    return out


def chat_messages(value: Any) -> list[dict]:
    """OpenAI messages as the chat template reads them: role, content (text, or text parts), the tool-call
    fields as given."""
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
    host = ServerState.of(request).host
    cards = [_model_card(host.info)] + [_model_card(host.info, a) for a in host.adapters.aliases.values()]
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    host = ServerState.of(request).host
    info, name, aliases = host.info, request.path_params["model"], host.adapters.aliases
    if name != info.name and name not in aliases:
        raise RequestError(f"the model '{name}' does not exist (this server has "
                           f"{', '.join(repr(n) for n in [info.name, *aliases])})", 404, param="model",
                           code="model_not_found")
    return JSONResponse(_model_card(info, aliases.get(name)))


def _model_card(info, adapter=None) -> dict:
    """The base model's card, or an adapter alias's (the base with that adapter: `meta.lora`)."""
    meta = {"n_ctx": info.n_ctx, "n_ctx_train": info.n_ctx_train, "n_params": info.n_params,
            "n_vocab": info.n_vocab, "file_type": info.file_type, "size": info.size}
    if adapter is None:
        return {"id": info.name, "object": "model", "created": int(info.modified), "owned_by": "llmrun",
                "meta": meta}
    return {"id": adapter.alias, "object": "model", "created": int(info.modified), "owned_by": "llmrun",
            "parent": info.name,
            "meta": {**meta, "lora": {"id": adapter.id, "path": adapter.path, "scale": adapter.scale}}}


async def list_lora_adapters(request: Request) -> Response:
    """GET /lora-adapters (llama.cpp's): [{"id", "path", "scale"[, "alias"]}, ...], scales the global ones."""
    return JSONResponse(ServerState.of(request).host.adapters.listing())


async def set_lora_adapters(request: Request) -> Response:
    """POST /lora-adapters [{"id": i, "scale": s}, ...]: the global scales (ids not listed: 0), for requests
    that choose no adapters themselves; running requests keep theirs."""
    state = ServerState.of(request)
    adapters = state.host.adapters
    adapters.set_global(adapters.parse(await read_json(request, state.config.max_body_bytes, array=True), "body"))
    return JSONResponse({"success": True})


async def chat_completions(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    messages = chat_messages(f.raw("messages"))
    kw = api_keywords(f, state, chat=True)
    stream, include_usage = _stream_flags(f)
    run = _run(f, state, kw)
    result = await state.call(request, run, state.host.llm.create_chat_completion, messages, stream=stream, **kw)
    if stream:
        return sse_response(iterate_in_thread(result), run, include_usage)
    return JSONResponse(result)


async def completions(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    prompts = _completion_prompts(f.raw("prompt"), state)
    kw = api_keywords(f, state, chat=False)
    stream, include_usage = _stream_flags(f)
    n = kw.get("n", 1)
    run = _run(f, state, kw)
    calls = []
    for p in prompts:   # one API call per prompt; its choices are numbered after the earlier prompts'
        calls.append(await state.call(request, run, state.host.llm.create_completion, p, stream=stream, **kw))
    if stream:
        return sse_response(_merged(calls, n), run, include_usage)
    if len(calls) == 1:
        return JSONResponse(calls[0])
    out = dict(calls[0])
    out["choices"] = [{**c, "index": k * n + c["index"]} for k, result in enumerate(calls) for c in result["choices"]]
    out["usage"] = run.usage()
    return JSONResponse(out)


async def embeddings(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    inputs = f.raw("input")
    if inputs is None:
        raise RequestError("'input' is required", param="input")
    encoding = f.string("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise RequestError("'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
    if f.integer("dimensions") is not None:
        raise RequestError("'dimensions' is not supported (the model's width is fixed)", param="dimensions")
    config, name = state.host.adapters.for_request(f.raw("lora"), f.raw("model"))
    result = await state.call(request, Run(config), state.host.llm.create_embedding, inputs, model=name)
    if encoding == "base64":   # what the openai client asks for by default: little-endian float32 bytes
        for item in result["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], "<f4").tobytes()).decode("ascii")
    return JSONResponse(result)


# ---- helpers -----------------------------------------------------------------------------------------------
def _run(f: Fields, state: ServerState, kw: dict) -> Run:
    """The request's Run under the adapters it chooses (`lora`, or an alias as `model`); results carry the
    alias as their model name."""
    config, kw["model"] = state.host.adapters.for_request(f.raw("lora"), f.raw("model"))
    return Run(config)


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


async def _merged(calls: list[Iterator[dict]], n: int) -> AsyncIterator[dict]:
    """The chunks of one streamed call per prompt, one prompt after the other (choice indices renumbered)."""
    for k, chunks in enumerate(calls):
        async for chunk in iterate_in_thread(chunks):
            if k:
                chunk = {**chunk, "choices": [{**c, "index": k * n + c["index"]} for c in chunk["choices"]]}
            yield chunk


def sse_response(chunks: AsyncIterator[dict], run: Run, include_usage: bool) -> StreamingResponse:
    """Server-Sent Events: one `data:` line per chunk (with include_usage, `"usage": null` on each and a last
    chunk with the usage and no choices), then `data: [DONE]`. A fault after the stream began is sent as an
    error object (the status line is gone by then). Closing the stream cancels the run."""
    def line(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def body():
        last = None
        try:
            async for c in chunks:
                last = c
                yield line({**c, "usage": None} if include_usage else c)
            if include_usage and last is not None:
                yield line({**last, "choices": [], "usage": run.usage()})
        except RequestError as e:
            yield line({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
        finally:
            run.cancel()
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
