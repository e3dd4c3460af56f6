"""Ollama's endpoints: /api/tags, /api/show, /api/ps, /api/version, /api/chat, /api/generate, /api/embed
(and the older /api/embeddings), so that applications written for Ollama work unchanged.

Streams are NDJSON (one JSON object per line), on by default as in Ollama. `options` map onto the Python
API's keywords (num_predict -> max_tokens, ...) with Ollama's defaults for what is absent; load-time
options (num_ctx, num_thread, num_gpu, ...) are the server's to choose and are ignored. Errors are
`{"error": "message"}`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .. import __version__
from .errors import RequestError
from .openai_api import chat_messages
from .params import Fields, read_json
from .runs import Run
from .state import ServerState, iterate_in_thread

# Ollama's defaults (its api/types.go DefaultOptions) for the sampling options a request leaves out.
OLLAMA_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, repeat_last_n=64,
                       frequency_penalty=0.0, presence_penalty=0.0, max_tokens=None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_keywords(body: Fields, state: ServerState) -> dict[str, Any]:
    """Ollama's options and format as the Python API's keywords, with Ollama's defaults for what is absent."""
    o = Fields(body.object("options") or {}, "options.")
    kw = dict(OLLAMA_DEFAULTS)
    num_predict = o.integer("num_predict", None, lo=-2, hi=state.config.max_tokens or state.host.n_ctx)
    if num_predict is not None:
        if num_predict == 0:
            raise RequestError("'options.num_predict' must not be 0", param="options.num_predict")
        kw["max_tokens"] = num_predict if num_predict > 0 else None   # -1: unlimited, -2: fill the context
    kw.update({k: v for k, v in {
        "temperature": o.number("temperature", None, lo=0, hi=100),
        "top_k": o.integer("top_k", None, lo=0, hi=1 << 20),
        "top_p": o.number("top_p", None, lo=0, hi=1),
        "min_p": o.number("min_p", None, lo=0, hi=1),
        "repeat_penalty": o.number("repeat_penalty", None, lo=1e-3, hi=100),
        "repeat_last_n": o.integer("repeat_last_n", None, lo=-1, hi=1 << 20),
        "frequency_penalty": o.number("frequency_penalty", None, lo=-2, hi=2),
        "presence_penalty": o.number("presence_penalty", None, lo=-2, hi=2),
        "seed": o.integer("seed", None, lo=-(1 << 63), hi=(1 << 64) - 1),
        "stop": o.stop("stop"),
    }.items() if v is not None})
    if kw.get("seed") is not None and kw["seed"] < 0:
        kw.pop("seed")
    o.integer("num_ctx", None, lo=0)   # type-checked; the context size is the server's
    fmt = body.raw("format")
    if fmt is not None and fmt != "":
        kw["response_format"] = _response_format(fmt)
    kw["model"] = state.host.name
    return kw


def _response_format(fmt: Any) -> dict:
    """Ollama's format ("json" or a JSON schema) as OpenAI's response_format."""
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    raise RequestError("'format' must be \"json\" or a JSON schema object", param="format")


def _tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI tool calls -> Ollama's (arguments as an object, not a JSON string)."""
    out = []
    for call in calls:
        fn = call.get("function", {})
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass
        out.append({"function": {"name": fn.get("name"), "arguments": args}})
    return out


def _done_fields(run: Run, finish: str | None) -> dict:
    t = run.first.timings if run.first is not None else {}
    ns = 1e9
    return {"done": True, "done_reason": "stop" if finish == "tool_calls" else finish,
            "total_duration": int((time.perf_counter() - run.started) * ns), "load_duration": 0,
            "prompt_eval_count": int(t.get("n_prompt_eval", t.get("n_prompt", 0))),
            "prompt_eval_duration": int(t.get("t_prompt", 0.0) * ns),
            "eval_count": int(t.get("n_gen", 0)), "eval_duration": int(t.get("t_gen", 0.0) * ns)}


def _ndjson(lines, run: Run) -> StreamingResponse:
    async def body():
        try:
            async for line in lines:
                yield json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n"
        except RequestError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            run.cancel()
    return StreamingResponse(body(), media_type="application/x-ndjson")


# ---- generation --------------------------------------------------------------------------------------------
def _run(f: Fields, state: ServerState) -> Run:
    """The request's Run under the adapters its `model` (an alias) or `lora` field chooses."""
    config, _ = state.host.adapters.for_request(f.raw("lora"), f.raw("model"))
    return Run(config)


async def chat(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    model = f.string("model", state.host.name)
    raw_messages = f.array("messages", required=True)
    if not raw_messages:   # Ollama: an empty chat just loads the model
        return JSONResponse({"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done": True, "done_reason": "load"})
    for i, m in enumerate(raw_messages):
        if isinstance(m, dict) and m.get("images"):
            raise RequestError(f"'messages[{i}].images': images are not supported")
    messages = chat_messages(raw_messages)
    kw = ollama_keywords(f, state)
    if f.array("tools"):
        kw["tools"] = f.array("tools")
    stream = f.boolean("stream", True)
    run = _run(f, state)
    result = await state.call(request, run, state.host.llm.create_chat_completion, messages, stream=stream, **kw)

    def line(message: dict) -> dict:
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", **message}, "done": False}

    if stream:
        async def lines():
            async for chunk in iterate_in_thread(result):
                choice = chunk["choices"][0]
                delta = choice["delta"]
                if delta.get("content"):
                    yield line({"content": delta["content"]})
                if delta.get("tool_calls"):
                    yield line({"content": "", "tool_calls": _tool_calls(delta["tool_calls"])})
                if choice["finish_reason"] is not None:
                    yield {**line({"content": ""}), **_done_fields(run, choice["finish_reason"])}
        return _ndjson(lines(), run)
    choice = result["choices"][0]
    message = {"content": choice["message"].get("content") or ""}
    if choice["message"].get("tool_calls"):
        message["tool_calls"] = _tool_calls(choice["message"]["tool_calls"])
    return JSONResponse({**line(message), **_done_fields(run, choice["finish_reason"])})


async def generate(request: Request) -> Response:
    state = ServerState.of(request)
    llm = state.host.llm
    f = Fields(await read_json(request, state.config.max_body_bytes))
    model = f.string("model", state.host.name)
    prompt = f.string("prompt", "")
    if f.array("images"):
        raise RequestError("'images' are not supported", param="images")
    if f.string("suffix"):
        raise RequestError("'suffix' (fill in the middle) is not supported", param="suffix")
    if f.string("template"):
        raise RequestError("'template' is not supported: the model's own chat template is used", param="template")
    context = f.array("context") or []
    n_vocab = state.host.info.n_vocab
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in context):
        raise RequestError(f"'context' must be token ids from 0 to {n_vocab - 1}", param="context")
    if not prompt and not context:   # Ollama: an empty prompt just loads the model
        return JSONResponse({"model": model, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    kw = ollama_keywords(f, state)
    stream = f.boolean("stream", True)
    system = f.string("system")
    raw = f.boolean("raw", False)

    def prompt_tokens() -> list[int]:
        """The context (an earlier answer's tokens) and then the prompt: raw, or through the chat template."""
        if raw:
            new = llm.tokenize(prompt.encode("utf-8"), add_bos=not context, special=True) if prompt else []
        else:
            new = llm.chat_tokens(([{"role": "system", "content": system}] if system else []) +
                                  [{"role": "user", "content": prompt}])
            if context and new and new[0] == llm.token_bos():
                new = new[1:]
        return list(context) + new

    run = _run(f, state)
    tokens = await state.call(request, run, prompt_tokens)
    result = await state.call(request, run, llm.create_completion, tokens, stream=stream, **kw)

    def final(finish, text="") -> dict:
        return {"model": model, "created_at": _now(), "response": text,
                "context": tokens + (list(run.first.generated) if run.first else []), **_done_fields(run, finish)}

    if stream:
        async def lines():
            async for chunk in iterate_in_thread(result):
                choice = chunk["choices"][0]
                if choice["text"]:
                    yield {"model": model, "created_at": _now(), "response": choice["text"], "done": False}
                if choice["finish_reason"] is not None:
                    yield final(choice["finish_reason"])
        return _ndjson(lines(), run)
    choice = result["choices"][0]
    return JSONResponse(final(choice["finish_reason"], choice["text"]))


async def embed(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    inputs = f.raw("input")
    if not (isinstance(inputs, str) or (isinstance(inputs, list) and inputs and
                                        all(isinstance(s, str) for s in inputs))):
        raise RequestError("'input' must be a string or a non-empty list of strings", param="input")
    t0 = time.perf_counter()
    # Ollama's /api/embed returns unit vectors
    result = await state.call(request, _run(f, state), state.host.llm.create_embedding, inputs, normalize=True)
    vectors = [d["embedding"] for d in result["data"]]
    return JSONResponse({"model": f.string("model", state.host.name), "embeddings": vectors,
                         "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                         "prompt_eval_count": int(result.get("usage", {}).get("prompt_tokens", 0))})


async def embeddings_legacy(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    prompt = f.string("prompt", required=True)
    result = await state.call(request, _run(f, state), state.host.llm.create_embedding, prompt)
    return JSONResponse({"embedding": result["data"][0]["embedding"]})


# ---- model listing -------------------------------------------------------------------------------------------
def _details(info) -> dict:
    return {"parent_model": "", "format": "gguf", "family": info.architecture, "families": [info.architecture],
            "parameter_size": info.parameter_size, "quantization_level": info.file_type.upper()}


def _entry(info) -> dict:
    modified = datetime.fromtimestamp(info.modified, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": info.name, "model": info.name, "modified_at": modified, "size": info.size,
            "digest": info.digest, "details": _details(info)}


def _entries(host) -> list[dict]:
    """The base model, then one entry per adapter alias (the base with that adapter)."""
    base = _entry(host.info)
    out = [base]
    for a in host.adapters.aliases.values():
        digest = hashlib.sha256(f"{base['digest']}:{a.path}:{a.scale}".encode()).hexdigest()
        out.append({**base, "name": a.alias, "model": a.alias, "digest": digest,
                    "details": {**base["details"], "parent_model": host.info.name}})
    return out


async def tags(request: Request) -> Response:
    return JSONResponse({"models": _entries(ServerState.of(request).host)})


async def ps(request: Request) -> Response:
    state = ServerState.of(request)
    entry = _entry(state.host.info)
    entry.update(expires_at="2999-01-01T00:00:00Z", size_vram=0)
    return JSONResponse({"models": [entry]})


async def show(request: Request) -> Response:
    state = ServerState.of(request)
    f = Fields(await read_json(request, state.config.max_body_bytes))
    name = f.string("model") or f.string("name")
    info = state.host.info
    if name is None:
        raise RequestError("'model' is required", param="model")
    if name.removesuffix(":latest") not in (info.name, *state.host.adapters.aliases):
        raise RequestError(f"model '{name}' not found", 404)
    model_info = {k: v for k, v in info.metadata.items() if not k.startswith("tokenizer.")}
    return JSONResponse({"modelfile": "", "parameters": "", "template": info.chat_template or "",
                         "details": _details(info), "model_info": model_info,
                         "capabilities": ["completion", "tools", "embedding"],
                         "modified_at": _entry(info)["modified_at"]})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})
