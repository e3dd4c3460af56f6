"""Tool calls: checking OpenAI ``tools`` / ``tool_choice``, the JSON schema that forces a call, and parsing
calls out of generated text into OpenAI's ``tool_calls``.

Formats recognised in the output (what the common chat templates teach their models):

* Hermes / Qwen:  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (one or more, text before them
  is the message content);
* Llama 3.x:      ``{"name": ..., "parameters": {...}}`` (optionally after ``<|python_tag|>``, several joined
  by ``;``);
* Mistral:        ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]`` and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``;
* plain JSON:     a call object, a list of them, or ``{"tool_calls": [...]}``; also inside a ```json fence.

A call only counts when its name is one of the offered tools. With ``tool_choice="required"`` or a named
function, decoding is constrained by ``forced_call_schema`` so that the output is one plain-JSON call whose
arguments validate against the tool's parameters.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Mapping, Sequence

from ..errors import ToolCallError


def check_tools(tools) -> list[dict]:
    """``tools`` in OpenAI's shape (``[{"type": "function", "function": {"name", "description", "parameters"}}]``),
    checked; returns plain dicts. A bare function dict (``{"name": ..., "parameters": ...}``) is accepted too."""
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ToolCallError(f"tools must be a list (got {type(tools).__name__})")
    out, names = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ToolCallError(f"tools[{i}] must be a dict")
        if "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": dict(tool)}
        if tool.get("type", "function") != "function":
            raise ToolCallError(f"tools[{i}]: only type 'function' is supported (got {tool.get('type')!r})")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolCallError(f"tools[{i}] needs function.name (a non-empty string)")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ToolCallError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object")
        if fn["name"] in names:
            raise ToolCallError(f"tools: function {fn['name']!r} is listed twice")
        names.add(fn["name"])
        out.append({**tool, "type": "function", "function": {**fn, "parameters": params}})
    return out


def resolve_tool_choice(tool_choice, tools: Sequence[Mapping]) -> tuple[str, str | None]:
    """(mode, function name): mode is "none", "auto" or "required"; a named function gives ("required", name).

    Accepts "none" / "auto" / "required", ``{"type": "function", "function": {"name": N}}`` and a bare name.
    """
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            if tool_choice == "required" and not tools:
                raise ToolCallError('tool_choice "required" needs tools')
            return tool_choice, None
        name = tool_choice
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else tool_choice.get("name")
        if not isinstance(name, str):
            raise ToolCallError('tool_choice must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}')
    else:
        raise ToolCallError(f"tool_choice must be a string or a dict (got {type(tool_choice).__name__})")
    if name not in names:
        raise ToolCallError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(names) or 'none'})")
    return "required", name


def forced_call_schema(tools: Sequence[Mapping], name: str | None = None) -> dict:
    """JSON schema of one call ``{"name": N, "arguments": {...}}`` to the named tool, or to any of them."""
    def one(tool):
        fn = tool["function"]
        return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
                "required": ["name", "arguments"], "additionalProperties": False}
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ToolCallError("no tool to call")
    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(t) for t in chosen]}


def describe_tools(messages: Sequence[Mapping], tools: Sequence[Mapping]) -> list[dict]:
    """The conversation with the tools described in its system message, for chat templates that ignore
    `tools` (llama.cpp does the same for them): the model is told the functions and the plain-JSON call
    format that parse_tool_calls reads."""
    text = ("You can call these functions. To call one, answer only with a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}.\n'
            + "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = out[0]["content"] + "\n\n" + text
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


# ---- parsing --------------------------------------------------------------------------------------------
_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _as_call(obj, names: set[str]) -> dict | None:
    """One OpenAI tool call from a parsed object, or None when it is not a call to an offered tool."""
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("function"), Mapping):          # OpenAI's own shape echoed back
        obj = {**obj["function"], "id": obj.get("id")}
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, Mapping):
        return None
    call_id = obj.get("id") if isinstance(obj.get("id"), str) and obj.get("id") else new_call_id()
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _json_values(text: str) -> list | None:
    """Consecutive JSON values in ``text`` (separated by whitespace, ';' or ','), or None if anything else."""
    values, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;,":
            i += 1
        if i >= n:
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


def _calls_from_values(values, names) -> list[dict] | None:
    objs = []
    for v in values:
        if isinstance(v, Mapping) and isinstance(v.get("tool_calls"), list):
            objs.extend(v["tool_calls"])
        elif isinstance(v, list):
            objs.extend(v)
        else:
            objs.append(v)
    calls = [_as_call(o, names) for o in objs]
    return calls if calls and all(c is not None for c in calls) else None


def parse_tool_calls(text: str, tools: Sequence[Mapping]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a generated message. No recognised call: (text, [])."""
    names = {t["function"]["name"] for t in tools}
    if not names or not text:
        return text, []
    stripped = text.strip()

    if "<tool_call>" in stripped:                                      # Hermes / Qwen
        head = stripped[:stripped.index("<tool_call>")].strip()
        calls = []
        for body in _HERMES.findall(stripped):
            values = _json_values(body)
            found = _calls_from_values(values, names) if values else None
            if found is None:
                return text, []
            calls.extend(found)
        return (head or None), calls

    if stripped.startswith("[TOOL_CALLS]"):                            # Mistral
        rest = stripped[len("[TOOL_CALLS]"):].strip()
        if "[ARGS]" in rest:
            calls = []
            for part in rest.split("[TOOL_CALLS]"):
                name, _, args = part.partition("[ARGS]")
                call = _as_call({"name": name.strip(), "arguments": args.strip()}, names)
                if call is None:
                    return text, []
                calls.append(call)
            return None, calls
        values = _json_values(rest)
        calls = _calls_from_values(values, names) if values else None
        return (None, calls) if calls else (text, [])

    body = stripped
    if body.startswith("<|python_tag|>"):                              # Llama 3.x
        body = body[len("<|python_tag|>"):].strip()
    fence = _FENCE.match(body)
    if fence:
        body = fence.group(1)
    if body[:1] in "{[":                                               # Llama 3.x JSON / plain JSON
        values = _json_values(body)
        calls = _calls_from_values(values, names) if values else None
        if calls:
            return None, calls
    return text, []


# How a message that is a tool call starts (after whitespace); Hermes calls may also follow some text.
_CALL_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "[", "```")
_HERMES_OPEN = "<tool_call>"


class CallStream:
    """Streams a message's content while holding back what may be a tool call, for ``stream=True`` with tools.

    ``push(text)`` returns the text safe to show as content now; ``finish()`` returns (the rest of the content,
    tool_calls). A message whose start looks like a call is held whole; in other text, everything from a
    ``<tool_call>`` (or a prefix of it at the end) on is held.
    """

    def __init__(self, tools: Sequence[Mapping]):
        self.tools = tools
        self.shown = ""        # content already given out
        self.held = ""
        self.undecided = True  # still at the start of the message
        self.calling = False   # a call has started: hold everything from here

    def push(self, text: str) -> str:
        self.held += text
        if self.calling:
            return ""
        if self.undecided:
            start = self.held.lstrip()
            if not start or any(m.startswith(start) or start.startswith(m) for m in _CALL_STARTS):
                if start.startswith(_CALL_STARTS):
                    self.calling = True
                return ""
            self.undecided = False
        at = self.held.find(_HERMES_OPEN)
        if at >= 0:
            self.calling = True
            out, self.held = self.held[:at], self.held[at:]
        else:
            keep = next((k for k in range(min(len(_HERMES_OPEN) - 1, len(self.held)), 0, -1)
                         if _HERMES_OPEN.startswith(self.held[-k:])), 0)
            out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        self.shown += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.shown + self.held, self.tools)
        if not calls:
            rest, self.held = self.held, ""
            return rest, []
        # the content parse_tool_calls found was shown already (a Hermes call after text), or there was none
        return "", calls


__all__ = ["CallStream", "ToolCallError", "check_tools", "describe_tools", "forced_call_schema",
           "parse_tool_calls", "resolve_tool_choice"]
