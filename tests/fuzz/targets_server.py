"""Fuzz target over the server's HTTP bodies (issue 13): requests to every endpoint of an in-process
`llmrun serve` app on the tiny model, built from valid ones with fields dropped, added and replaced by hostile
values, and raw bodies (broken JSON, invalid UTF-8, deep nesting, NaN, huge numbers). A 2xx whose body or
stream is well formed is a success; a 4xx in the endpoint's error shape with a one-line message is a clean
error; a 5xx, another shape or a broken stream is a failure."""
from __future__ import annotations

import atexit
import json

from harness import Case, target

from llmrun.errors import LlmrunError

_CLIENT = None


def _client(env):
    """One app for the whole target (its scheduler thread runs until the process ends)."""
    global _CLIENT
    if _CLIENT is None:
        from starlette.testclient import TestClient

        from llmrun.server import ModelHost, ServerConfig, create_app
        host = ModelHost(env["model"], n_ctx=64, n_threads=1, n_slots=2)
        app = create_app(host, ServerConfig(max_body_bytes=1 << 16, max_queue=4, max_n=3))
        _CLIENT = TestClient(app, base_url="http://127.0.0.1:8080", raise_server_exceptions=False)
        _CLIENT.__enter__()                      # lifespan: the scheduler starts
        atexit.register(_CLIENT.__exit__, None, None, None)
    return _CLIENT


_MSG = [{"role": "user", "content": "hi"}]
_VALID = {
    "/v1/chat/completions": {"messages": _MSG, "max_tokens": 3},
    "/v1/completions": {"prompt": "Once", "max_tokens": 3},
    "/v1/embeddings": {"input": "hello"},
    "/api/chat": {"messages": _MSG, "options": {"num_predict": 3}, "stream": False},
    "/api/generate": {"prompt": "Once", "options": {"num_predict": 3}},
    "/api/embed": {"input": ["a", "b"]},
    "/api/show": {"model": "tiny.q8_0"},
}
_FIELDS = ["messages", "prompt", "input", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty", "seed", "stop",
           "stream", "stream_options", "n", "best_of", "logprobs", "top_logprobs", "logit_bias", "response_format",
           "grammar", "tools", "tool_choice", "functions", "function_call", "echo", "suffix", "model", "options",
           "format", "raw", "system", "context", "template", "images", "encoding_format", "dimensions",
           "typical_p", "mirostat_mode", "tfs_z", "user", "keep_alive", "num_predict", "lora"]
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                          "properties": {"a": {"type": "string"}}}}}
_VALUES = [None, True, False, 0, 1, -1, 2, 3, 0.5, -0.5, 1e308, -1e308, 10**30, -(10**30), 2**63, "", "x",
           "hi<|im_end|>", "\x00\u202e\ud7ff", "a" * 3000, [], [1], [-5, 10**9], ["stop"], ["a"] * 40, {}, {"a": 1},
           [[]], [{"role": "user"}], [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "x"}]}],
           {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
           {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"$ref": "#"}}}}},
           {"type": "json_schema"}, {"include_usage": True}, {"include_usage": "yes"}, [_TOOL], [_TOOL, _TOOL],
           "required", "auto", "none", {"type": "function", "function": {"name": "f"}}, {"1": 100}, {"x": 1},
           {"num_predict": 2, "temperature": 0}, {"num_predict": -2}, {"num_predict": "x"}, {"seed": -1},
           "json", {"type": "object"}, 'root ::= "a" | "b"', "root ::= (", list(range(70)),
           [{"id": 0, "scale": 1.0}], [{"id": -1, "scale": 1}], [{"id": 0, "scale": 1e308}], [{"id": 0}],
           [{"id": 10**30, "scale": "x"}], [{"scale": 1}], [{"id": 0, "scale": 1}, {"id": 0, "scale": 2}],
           "tiny-tune", "tiny.q8_0:latest"]
# POST /lora-adapters takes an array: [{"id": i, "scale": s}, ...] (this server has no adapters: ids are bad)
_LORA_BODIES = [[], [{"id": 0, "scale": 0.5}], [{"id": 0}], [{"id": True, "scale": 1}], [{"id": 0, "scale": None}],
                [{"id": 1.5, "scale": 1}], [{"id": 0, "scale": 1, "extra": 1}], [[]], [None], {"id": 0}, "x"]
_RAW = [b"", b"{", b"[", b"null", b"[]", b"42", b'"x"', b"{'a': 1}", b"\xff\xfe{}", b'{"messages": NaN}',
        b'{"temperature": Infinity}', b'{"max_tokens": ' + b"9" * 5000 + b"}", b"[" * 3000 + b"]" * 3000,
        b'{"a": ' * 200 + b"1" + b"}" * 200, b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b"\x00" * 100, b'{"prompt": "' + b"a" * 70000 + b'"}']


def _body(rng, path: str) -> bytes:
    if rng.random() < 0.2:
        return rng.choice(_RAW)
    if path == "/lora-adapters":
        return json.dumps(rng.choice(_LORA_BODIES + _VALUES)).encode()
    body = json.loads(json.dumps(_VALID.get(path, {})))
    for _ in range(rng.randint(0, 4)):
        op = rng.random()
        if op < 0.25 and body:
            body.pop(rng.choice(list(body)))
        else:
            body[rng.choice(_FIELDS)] = rng.choice(_VALUES)
    if body.get("stream") is True and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _check_ok(path: str, r) -> None:
    kind = r.headers.get("content-type", "")
    if kind.startswith("text/event-stream"):
        events = r.text.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]", r.text[-200:]
        for e in events[:-2]:
            assert e.startswith("data: "), e[:100]
            assert "error" not in json.loads(e[6:]), e[:300]
    elif kind.startswith("application/x-ndjson"):
        lines = r.text.split("\n")
        assert lines[-1] == "", r.text[-200:]
        objs = [json.loads(line) for line in lines[:-1]]
        assert objs and objs[-1]["done"] and all("error" not in o for o in objs), r.text[-300:]
    elif kind.startswith("application/json"):
        r.json()


def _check(path: str, r) -> None:
    assert r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if r.status_code < 400:
        _check_ok(path, r)
        return
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str), err
        message = err
    else:
        assert set(err) == {"message", "type", "param", "code"}, err
        message = err["message"]
    raise LlmrunError(message)                   # counted as a clean error (one line, checked by the harness)


@target("server-http", 400)
def server_http(rng, env):
    posts = list(_VALID) + ["/lora-adapters"]
    paths = posts + ["/v1/models", "/api/tags", "/health", "/v1/nope", "/api/ps", "GET /lora-adapters"]
    for i in range(10**9):
        path = rng.choice(paths)
        body = _body(rng, path)

        def run(wd, path=path, body=body):
            client = _client(env)
            if path in posts:
                r = client.post(path, content=body, headers={"Content-Type": "application/json"})
            else:
                r = client.get(path.removeprefix("GET "))
            _check(path, r)
        yield Case(f"server-http #{i} {path} {body[:200]!r}", run)
