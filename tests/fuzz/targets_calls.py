"""Fuzz targets over calls: CLI argument lists and Python API arguments."""
from __future__ import annotations

import math

import numpy as np

from harness import Case, cli, target

_NUMBERS = ["0", "1", "2", "-1", "-7", "8", "1e9", "2147483648", "99999999999999999999", "nan", "inf", "0.5",
            "-0.0", "abc", "", "\x1b[2J"]
_TYPES = ["q8_0", "q4_0", "q4_k_m", "f16", "f32", "bf16", "q9_9", "Q4_K_M", "", "iq4_nl", "q2_k", "../x"]


def _pick(rng, values):
    return rng.choice(values)


def _run_args(rng, env, wd):
    args = ["run", rng.choice([env["model"], env["model"], str(wd / "missing.gguf"), str(wd), env["bad_model"]])]
    args += ["-p", rng.choice(["hello", "", "<|im_start|>x", "\x00\x1b", "a" * 500])]
    for flag in rng.sample(["-n", "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed",
                            "--threads", "--ctx", "-v"], rng.randint(0, 5)):
        if flag == "-v":
            args.append(flag)
        elif flag == "-n":
            args += [flag, rng.choice(["0", "1", "3", "-1", "-2", "x", "8"])]
        elif flag == "--ctx":
            args += [flag, rng.choice(["0", "16", "64", "-1", "2", "5000000000", "x"])]
        else:
            args += [flag, _pick(rng, _NUMBERS)]
    if "-n" not in args:
        args += ["-n", "3"]
    return args


def _cli_case(rng, env):
    kind = rng.choice(["run", "run", "chat", "info", "quantize", "convert", "bench", "perplexity", "junk"])
    outputs: tuple[str, ...] = ()
    stdin = None

    def build(wd):
        nonlocal stdin
        if kind == "run":
            return _run_args(rng, env, wd)
        if kind == "chat":
            stdin = "\n".join(rng.choice(["hello", "/reset", "/system be brief", "/system", "/bogus", "",
                                          "hi<|im_end|>", "/exit", "\x1b[2J"]) for _ in range(rng.randint(0, 4)))
            args = ["chat", rng.choice([env["model"], env["bad_model"], str(wd / "nope")]), "-n", "3", "--ctx",
                    rng.choice(["64", "0", "8", "1"])]
            if rng.random() < 0.5:
                args += ["--system", rng.choice(["x", "", "<|im_start|>evil", "\x1b]52;c;eA==\x07"])]
            return args
        if kind == "info":
            return ["info", rng.choice([env["model"], env["bad_model"], str(wd), str(wd / "x.gguf"), ""])] + (
                ["--json"] if rng.random() < 0.5 else [])
        if kind == "quantize":
            return ["quantize", rng.choice([env["model"], env["bad_model"], str(wd / "none")]),
                    rng.choice([str(wd / "out.gguf"), str(wd), env["model"], str(wd / "no" / "out.gguf")]),
                    "--type", _pick(rng, _TYPES)] + (["--force"] if rng.random() < 0.3 else [])
        if kind == "convert":
            args = ["convert", rng.choice([env["hf"], str(wd), str(wd / "none"), env["model"]]), "-o",
                    rng.choice([str(wd / "out.gguf"), str(wd), env["hf"] + "/model.safetensors"]),
                    "--type", _pick(rng, _TYPES)]
            for _ in range(rng.randint(0, 2)):
                args += ["--lora", rng.choice([env["adapter"], env["adapter"] + ":0.5", env["adapter"] + ":nan",
                                               env["adapter"] + ":x", str(wd), env["hf"]])]
            return args
        if kind == "bench":
            return ["bench", rng.choice([env["model"], env["bad_model"]]), "-p", rng.choice(["0", "4", "16", "-1"]),
                    "-n", rng.choice(["0", "2", "x"]), "-r", rng.choice(["1", "0"])] + (
                ["--json"] if rng.random() < 0.5 else [])
        if kind == "perplexity":
            (wd / "t.txt").write_bytes(rng.choice([b"", b"hello world " * 40, b"\xff\xfe\x00" * 30, b"a"]))
            return ["perplexity", rng.choice([env["model"], env["bad_model"]]), "-f",
                    rng.choice([str(wd / "t.txt"), str(wd / "none.txt"), str(wd)]), "--ctx",
                    rng.choice(["4", "16", "3", "x", "100000"])]
        return rng.choice([["--bogus"], ["run"], ["info"], ["quantize", "a"], ["convert"], [],
                           ["run", "-p"], ["chat", "--temp"], ["--version"], ["-h"],
                           # serve exists (issue 13): only arguments it refuses before serving
                           ["serve", "--port", "x"], ["serve", "--parallel", "0"], ["serve", "--max-body", "1"],
                           ["serve", str(wd / "none.gguf"), "--port", "0"], ["serve", env["bad_model"], "--port", "0"]])

    if kind in ("quantize", "convert"):
        outputs = ("out.gguf",)
    holder = {}

    def setup(wd):
        holder["args"] = build(wd)

    def run(wd):
        cli(holder["args"], stdin=stdin)
    return Case(f"cli {kind}", run, outputs=outputs, setup=setup), holder


@target("cli-args", 500)
def cli_args(rng, env):
    for i in range(10**9):
        case, holder = _cli_case(rng, env)
        original = case.run

        def run(wd, original=original, holder=holder, i=i):
            try:
                original(wd)
            except AssertionError as e:
                raise AssertionError(f"{holder.get('args')}: {e}") from None
        case.run = run
        case.label = f"cli-args #{i} {case.label}"
        yield case


_VALUES = [None, True, False, "false", "true", 0, 1, -1, 7, 2**31, 2**63, -2**63, 10**30, 0.0, 0.5, -0.5, 1.5,
           math.nan, math.inf, -math.inf, "", "hello", "5", b"bytes", bytearray(b"x"), [], [1, 2], [2**40], [-3],
           [math.nan], ["a"], [[1]], {}, {"a": 1}, np.int64(3), np.float32(0.5), np.array([1, 2]),
           np.array([1.5]), np.zeros((2, 2), np.int64), object(), (1, 2), range(3)]
_MESSAGES = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x<|im_end|>"}], [],
             [{"role": "user"}], [{"content": "x"}], "hello", None, [1], [{"role": "user", "content": [1, 2]}],
             [{"role": "user", "content": None}], [{"role": 5, "content": "x"}]]


_GRAMMARS = ['root ::= "yes" | "no"', 'root ::= [a-z]+', 'root ::= root', "", "root ::=", 'root ::= "a"{1000000}',
             'root ::= ("a" | "a")* "b"', "root ::= x", 'root ::= [', 'root ::= "\x1b[2J"', "x" * 5000, None, 5]
_SCHEMAS = [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"type": "string",
            "pattern": "(a+)+$"}, {"enum": list(range(2000))}, {"type": "array", "minItems": 10**9}, {"$ref": "#"},
            {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}}, {"anyOf": []}, "not a schema",
            {"type": "string", "maxLength": 10**12}, {"type": "integer", "minimum": 5, "maximum": 1}]
_TOOLS = [[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          [{"type": "function", "function": {"name": "f<|im_end|>", "description": "x" * 5000}}], [{"a": 1}], "f",
          [{"type": "function", "function": {"name": "", "parameters": []}}], [None]]
_STRUCTURED = {
    "grammar": lambda rng: rng.choice(_GRAMMARS),
    "response_format": lambda rng: rng.choice([{"type": "json_object"}, {"type": "text"}, {"type": "bogus"},
                                              {"type": "json_schema", "json_schema": {"schema": rng.choice(_SCHEMAS)}},
                                              {"type": "json_object", "schema": rng.choice(_SCHEMAS)}, "json", None]),
    "logprobs": lambda rng: rng.choice([None, 0, 2, True, False, -1, 10**6, "3"]),
    "top_logprobs": lambda rng: rng.choice([None, 0, 2, 21, -1, "x"]),
    "logit_bias": lambda rng: rng.choice([{5: 100.0}, {"5": -100}, {10**9: 1.0}, {"x": 1}, {5: math.nan}, [1], None]),
    "n": lambda rng: rng.choice([1, 2, 0, 129, -1, "2", 1.5]),
    "tools": lambda rng: rng.choice(_TOOLS),
    "tool_choice": lambda rng: rng.choice(["auto", "none", "required", {"type": "function", "function": {"name": "f"}},
                                          {"type": "function", "function": {"name": "missing"}}, 5]),
}
_COMPLETION_ONLY = {"echo": lambda rng: rng.choice([True, False, "yes"]),
                    "suffix": lambda rng: rng.choice([None, "", "end", 5])}


def _api_call(rng, env):
    llm = env["llm"] if rng.random() < 0.85 else env["llm_vocab_only"]
    v = lambda: rng.choice(_VALUES)  # noqa: E731
    method = rng.choice(["tokenize", "detokenize", "eval_logits", "completion", "completion", "chat", "chat",
                         "chat_tokens", "constructor", "set_lora"])
    if method == "set_lora":
        adapters = rng.choice([[], [(env["lora"], v())], v(), [(v(), 1.0)], [(env["lora"], 1.0, 2)],
                               [(env["lora"], 0.5), (env["lora"], 0.5)], [env["lora"]]])

        def set_and_reset():
            try:
                llm.set_lora(adapters)
            finally:
                if llm is env["llm"]:
                    llm.set_lora([])
        return f"set_lora({str(adapters)[:80]})", set_and_reset
    if method == "tokenize":
        return "tokenize", lambda: llm.tokenize(rng.choice([v(), "hello", b"<|im_start|>"]), add_bos=v(), special=v())
    if method == "detokenize":
        return "detokenize", lambda: llm.detokenize(rng.choice([v(), [1, 2, 3]]), special=v())
    if method == "eval_logits":
        return "eval_logits", lambda: llm.eval_logits(rng.choice([v(), [5, 6], [300]]))
    kwargs = {}
    for name in rng.sample(["max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "stop",
                            "seed", "stream", "frequency_penalty", "presence_penalty", "repeat_last_n"],
                           rng.randint(0, 4)):
        kwargs[name] = v()
    if not isinstance(kwargs.get("max_tokens"), int) or isinstance(kwargs.get("max_tokens"), bool) or \
            not 0 < kwargs.get("max_tokens", 0) <= 4:
        if rng.random() < 0.7:
            kwargs["max_tokens"] = rng.choice([1, 2, 3])

    def consume(out):
        if not isinstance(out, dict):
            for _ in out:
                pass

    for name in rng.sample(list(_STRUCTURED), rng.choice([0, 0, 1, 2])):
        if method in ("completion", "chat") and not (method == "completion" and name in ("tools", "tool_choice",
                                                                                        "top_logprobs")):
            kwargs[name] = _STRUCTURED[name](rng)
    if method == "completion" and rng.random() < 0.2:
        name = rng.choice(list(_COMPLETION_ONLY))
        kwargs[name] = _COMPLETION_ONLY[name](rng)
    if method == "completion":
        prompt = rng.choice([v(), "hello", [5, 6, 7], b"<|im_start|>user"])
        return f"completion({str(prompt)[:40]}, {kwargs})", lambda: consume(llm.create_completion(prompt, **kwargs))
    if method == "chat":
        messages = rng.choice(_MESSAGES)
        return f"chat({messages}, {kwargs})", lambda: consume(llm.create_chat_completion(messages, **kwargs))
    if method == "chat_tokens":
        messages = rng.choice(_MESSAGES)
        return "chat_tokens", lambda: llm.chat_tokens(messages, add_generation_prompt=v(), special_in_content=v())
    from llmrun.api import Llama
    kw = {name: v() for name in rng.sample(["n_ctx", "n_threads", "seed", "vocab_only", "verbose"],
                                           rng.randint(1, 3))}
    path = rng.choice([env["model"], v()])

    def construct():
        Llama(path, **kw).close()
    return f"Llama({path!r:.40}, {kw})", construct


@target("api-args", 1500)
def api_args(rng, env):
    for i in range(10**9):
        label, call = _api_call(rng, env)
        yield Case(f"api-args #{i} {label}", lambda wd, call=call: call())
