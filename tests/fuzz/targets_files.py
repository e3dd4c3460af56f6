"""Fuzz targets over files: GGUF bytes, GGUF metadata types, safetensors headers, checkpoint/adapter JSON."""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np

from harness import Case, target
from llmrun.gguf import GGUFValueType as VT

U8, I32, U32, U64, I64, F32, F64, STR, ARR, BOOL = (VT.UINT8, VT.INT32, VT.UINT32, VT.UINT64, VT.INT64,
                                                    VT.FLOAT32, VT.FLOAT64, VT.STRING, VT.ARRAY, VT.BOOL)


# --- GGUF ----------------------------------------------------------------------------------------------------
def open_model_everywhere(path: Path) -> None:
    """What a user can do with a model file: info (text and JSON), load, complete, chat."""
    from llmrun.api import Llama
    from llmrun.gguf import GGUFReader
    from llmrun.gguf.describe import describe, describe_text

    with GGUFReader(path) as r:
        describe_text(r)
        json.dumps(describe(r))
    llm = Llama(str(path), n_ctx=32)
    try:
        llm.create_completion("hello world", max_tokens=2, temperature=0)
        llm.create_chat_completion([{"role": "user", "content": "hi<|im_end|>"}], max_tokens=2, temperature=0)
    finally:
        llm.close()


_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


@target("gguf-bytes", 2000, isolated=True)
def gguf_bytes(rng, env):
    raw = Path(env["model"]).read_bytes()
    header_end = env["data_offset"]
    for i in range(10**9):
        b = bytearray(raw)
        kind = rng.choice(["flip", "flip", "word", "truncate", "data", "insert"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(24, header_end)] = rng.randrange(256)
        elif kind == "word":
            pos = rng.randrange(8, header_end - 8)
            width = rng.choice([4, 8])
            value = rng.choice(_INTERESTING) % (1 << (8 * width))
            b[pos:pos + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            b = b[:rng.randrange(0, len(b))]
        elif kind == "data":
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(header_end, len(b) - 4)
                b[pos:pos + 4] = rng.choice([struct.pack("<f", math.nan), struct.pack("<f", math.inf),
                                             struct.pack("<f", 3e38), b"\xff\xff\xff\xff"])
        else:
            pos = rng.randrange(24, header_end)
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        data = bytes(b)
        yield Case(f"gguf-bytes #{i} {kind}", lambda wd: open_model_everywhere(wd / "m.gguf"),
                   setup=lambda wd, data=data: (wd / "m.gguf").write_bytes(data))


def _metadata_values(rng):
    return [
        ("u32 0", (0, U32, None)), ("u32 max", (2**32 - 1, U32, None)), ("u64 huge", (2**63 + 5, U64, None)),
        ("i32 -1", (-1, I32, None)), ("i64 -2**40", (-2**40, I64, None)), ("f32 1e30", (1e30, F32, None)),
        ("f32 nan", (math.nan, F32, None)), ("f64 -inf", (-math.inf, F64, None)), ("f32 0", (0.0, F32, None)),
        ("f32 -1", (-1.0, F32, None)), ("str abc", ("abc", STR, None)), ("str empty", ("", STR, None)),
        ("str false", ("false", STR, None)), ("str escape", ("\x1b[2J\x1b]52;c;eA==\x07", STR, None)),
        ("bool", (True, BOOL, None)), ("u8 7", (7, U8, None)),
        ("str array", (["a", "b"], ARR, STR)), ("empty array", ([], ARR, STR)),
        ("i32 array", (np.arange(3, dtype=np.int32), ARR, I32)),
        ("f32 array 300", (np.zeros(300, np.float32), ARR, F32)),
        ("bool array", (np.array([True, False]), ARR, BOOL)),
        ("u32 array of layers", (np.full(2, rng.choice([0, 1, 4, 7, 2**31]), np.uint32), ARR, U32)),
        ("template", (rng.choice(["{{ messages[0].content }}", "{% for m in messages %}{{ m.content * 3 }}{% endfor %}",
                                  "{{ raise_exception('no') }}", "{% if %}", "{{ range(10**9)|list }}"]), STR, None)),
    ]


_EXTRA_KEYS = ["llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count",
               "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
               "llama.rope.scaling.yarn_beta_fast", "llama.rope.scale_linear", "llama.vocab_size",
               "tokenizer.ggml.scores", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.unknown_token_id",
               "tokenizer.ggml.eot_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.padding_token_id",
               "general.file_type", "general.quantization_version"]


@target("gguf-metadata", 860, isolated=True)
def gguf_metadata(rng, env):
    from helpers.tiny_files import rewrite
    keys = list(env["keys"]) + _EXTRA_KEYS
    combos = [(k, v) for k in keys for v in _metadata_values(rng)] + [(k, "drop") for k in keys]
    rng.shuffle(combos)
    # yarn scaling with each of its parameters broken needs the type set too
    for i, (key, value) in enumerate(combos):
        if value == "drop":
            label, setup = f"drop {key}", dict(drop_keys=(key,))
        else:
            name, kv = value
            extra = {"llama.rope.scaling.type": ("yarn", STR, None)} if "yarn" in key or "original" in key else {}
            label, setup = f"{key} = {name}", dict(set_keys={key: kv, **extra})
        yield Case(f"gguf-metadata #{i} {label}", lambda wd: open_model_everywhere(wd / "m.gguf"),
                   setup=lambda wd, setup=setup: rewrite(env["model"], wd / "m.gguf", **setup))


# --- safetensors headers -------------------------------------------------------------------------------------
def _pool(rng):
    return rng.choice([None, True, -1, 0, 7, 2**64 + 3, 1.5, math.inf, "F32", "BF16", "x", "", [], [0], [3, 4],
                       [0, 64], [0.0, 64.0], ["0", "64"], [-8, 8], [0, 2**62], {"a": 1}, [[1]], "../x"])


def _safetensors_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _header_bytes(header, data: bytes, rng) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text)
    if rng.random() < 0.05:
        n = rng.choice([0, n + 1, n - 1, 2**40, 2**64 - 1])
    return struct.pack("<Q", n % 2**64) + text + data


def open_safetensors(path: Path) -> None:
    from llmrun.convert.checkpoint import SafetensorsFile
    st = SafetensorsFile(path)
    try:
        for e in st.entries.values():
            np.asarray(st.view(e), dtype=np.float32).sum()
    finally:
        st.close()


@target("safetensors-headers", 800)
def safetensors_headers(rng, env):
    header, data = _safetensors_header(Path(env["safetensors"]))
    names = [k for k in header if k != "__metadata__"]
    for i in range(10**9):
        h = copy.deepcopy(header)
        kind = rng.choice(["field", "field", "field", "drop", "entry", "metadata", "raw", "overlap"])
        if kind == "field":
            h[rng.choice(names)][rng.choice(["dtype", "shape", "data_offsets"])] = _pool(rng)
        elif kind == "drop":
            del h[rng.choice(names)][rng.choice(["dtype", "shape", "data_offsets"])]
        elif kind == "entry":
            h[rng.choice(names + ["new", "__metadata__"])] = _pool(rng)
        elif kind == "metadata":
            h["__metadata__"] = _pool(rng)
        elif kind == "overlap":
            a, b = rng.sample(names, 2)
            h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (
                h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]
        else:
            h = rng.choice([b"[" * 100_000 + b"]" * 100_000, b"{", b"\xff\xfe", b"[]", b"null", b"{}",
                            json.dumps(header).encode()[:-3]])
        blob = _header_bytes(h, data, rng)
        yield Case(f"safetensors #{i} {kind}: {str(h)[:150] if not isinstance(h, bytes) else h[:40]!r}",
                   lambda wd: open_safetensors(wd / "model.safetensors"),
                   setup=lambda wd, blob=blob: (wd / "model.safetensors").write_bytes(blob))


# --- checkpoint and adapter JSON files -----------------------------------------------------------------------
_CONFIG_KEYS = ["architectures", "model_type", "hidden_act", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                "sliding_window", "use_sliding_window", "tie_word_embeddings", "vocab_size", "attention_bias",
                "bos_token_id", "eos_token_id", "original_max_position_embeddings", "text_config"]
_TOKENIZER_CONFIG_KEYS = ["bos_token", "eos_token", "add_bos_token", "add_eos_token", "chat_template",
                          "added_tokens_decoder", "add_prefix_space", "unk_token", "pad_token"]
_ADAPTER_KEYS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                 "fan_in_fan_out", "modules_to_save", "bias", "peft_type", "layer_replication"]
_TOKENIZER_JSON_PATHS = [("model", "type"), ("model", "merges"), ("model", "vocab"), ("model",),
                         ("pre_tokenizer",), ("pre_tokenizer", "pretokenizers"), ("post_processor",),
                         ("added_tokens",), ("decoder",), ("normalizer",)]


def _json_value(rng):
    return rng.choice([None, True, False, "false", "true", 0, -1, 1, 7, 10**7, 2**70, 0.0, -1e-5, 1e300, math.nan,
                       "abc", "", "../../etc/passwd", [], [1], ["q_proj"], [1.5], ["a", 1], {}, {"q_proj": "4"},
                       {"(": 2}, {"q_proj": 2}, {"rope_type": "yarn", "factor": [2]}, {"rope_type": "linear",
                       "factor": 2.0}, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0}, {"type": "dynamic", "factor": "x"}, [[1, 2]], {"a": {"b": []}}])


def _set_path(data, path, value):
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        node[path[-1]] = value


def convert_case(src: Path, out: Path, lora: Path | None) -> None:
    from llmrun.convert import convert_checkpoint
    convert_checkpoint(src, out, out_type="f16" if lora is None else "q8_0",
                       loras=[(lora, 1.0)] if lora is not None else [])


@target("checkpoint-json", 500)
def checkpoint_json(rng, env):
    hf, adapter = Path(env["hf"]), Path(env["adapter"])
    for i in range(10**9):
        kind = rng.choice(["config", "config", "tokenizer_config", "tokenizer_json", "adapter", "adapter", "raw"])
        file, key, value = None, None, _json_value(rng)
        if kind == "config":
            file, key = "config.json", rng.choice(_CONFIG_KEYS)
        elif kind == "tokenizer_config":
            file, key = "tokenizer_config.json", rng.choice(_TOKENIZER_CONFIG_KEYS)
        elif kind == "tokenizer_json":
            file, key = "tokenizer.json", rng.choice(_TOKENIZER_JSON_PATHS)
        elif kind == "adapter":
            file, key = "adapter/adapter_config.json", rng.choice(_ADAPTER_KEYS)
        else:
            file = rng.choice(["config.json", "tokenizer_config.json", "tokenizer.json", "adapter/adapter_config.json"])
            value = rng.choice(["[" * 50_000 + "]" * 50_000, "{", "[]", "null", "\xff", '{"a": NaN}', ""])
        with_lora = file.startswith("adapter") or rng.random() < 0.2

        def setup(wd, file=file, key=key, value=value):
            shutil.copytree(hf, wd / "src")
            shutil.copytree(adapter, wd / "src" / "adapter")
            p = wd / "src" / file
            if key is None:
                p.write_text(value)
                return
            data = json.loads(p.read_text())
            _set_path(data, key if isinstance(key, tuple) else (key,), value)
            p.write_text(json.dumps(data))

        label = f"checkpoint-json #{i} {file} {key} = {str(value)[:80]}"
        yield Case(label, lambda wd, with_lora=with_lora: convert_case(
            wd / "src", wd / "out.gguf", wd / "src" / "adapter" if with_lora else None),
            outputs=("out.gguf",), setup=setup)


# --- GGUF LoRA files (run-time adapters) ---------------------------------------------------------------------
def write_lora(path: Path, set_keys=None, drop_keys=(), tensors=None) -> Path:
    """A llama.cpp-layout GGUF LoRA for the fuzz model (n_embd 32, 4 heads of 8, 2 KV heads), rank 2."""
    from llmrun.gguf import GGMLType, GGUFWriter
    rng = np.random.default_rng(0)
    meta = {"general.architecture": ("llama", STR, None), "general.type": ("adapter", STR, None),
            "adapter.type": ("lora", STR, None), "adapter.lora.alpha": (4.0, F32, None)}
    for key in drop_keys:
        meta.pop(key, None)
    meta.update(set_keys or {})
    if tensors is None:
        tensors = {"blk.0.attn_q.weight.lora_a": rng.standard_normal((2, 32)).astype(np.float32),
                   "blk.0.attn_q.weight.lora_b": rng.standard_normal((32, 2)).astype(np.float32) * 0.1,
                   "blk.0.attn_v.weight.lora_a": rng.standard_normal((2, 32)).astype(np.float32),
                   "blk.0.attn_v.weight.lora_b": rng.standard_normal((16, 2)).astype(np.float32) * 0.1}
    w = GGUFWriter(path, overwrite=True)
    for key, (value, vtype, elem) in meta.items():
        w.add(key, value, vtype, elem)
    for name, arr in tensors.items():
        w.add_tensor(name, arr.shape, GGMLType.F32, np.ascontiguousarray(arr, np.float32))
    w.write()
    return path


def apply_lora(llm, path: Path, scale) -> None:
    try:
        llm.set_lora([(path, scale)])
        llm.create_completion("hello", max_tokens=2, temperature=0)
    finally:
        llm.set_lora([])


@target("lora-files", 400)
def lora_files(rng, env):
    llm = env["llm"]
    good = Path(env["lora"]).read_bytes()
    for i in range(10**9):
        kind = rng.choice(["meta", "meta", "tensors", "bytes", "scale"])
        scale = 1.0
        if kind == "meta":
            key = rng.choice(["general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                              "adapter.alora.invocation_tokens"])
            name, kv = rng.choice(_metadata_values(rng))
            how = rng.choice([dict(set_keys={key: kv}), dict(drop_keys=(key,))])
            label = f"{key} = {name}" if "set_keys" in how else f"drop {key}"
            setup = (lambda wd, how=how: write_lora(wd / "l.gguf", **how))
        elif kind == "tensors":
            name = rng.choice(["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.9.attn_q.weight", "token_embd.weight",
                               "output.weight", "blk.0.ffn_down.weight", "x", "blk.0.attn_norm.weight"])
            ra, rb = rng.choice([2, 0, 1, 5]), rng.choice([2, 0, 1, 5])
            shape_a = rng.choice([(ra, 32), (ra, 16), (32, ra), (ra, 280)])
            shape_b = rng.choice([(32, rb), (16, rb), (rb, 32), (64, rb)])
            fill = rng.choice([0.1, math.nan, math.inf, 1e30])
            parts = {f"{name}.lora_a": np.full([max(d, 1) for d in shape_a], fill, np.float32)}
            if rng.random() < 0.85:
                parts[f"{name}.lora_b"] = np.full([max(d, 1) for d in shape_b], 0.01, np.float32)
            label = f"tensors {list(parts)} A {shape_a} B {shape_b} fill {fill}"
            setup = (lambda wd, parts=parts: write_lora(wd / "l.gguf", tensors=parts))
        elif kind == "bytes":
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(24, len(b))] = rng.randrange(256)
            label, data = "byte flips", bytes(b)
            setup = (lambda wd, data=data: (wd / "l.gguf").write_bytes(data))
        else:
            scale = rng.choice([0.0, -1.0, 1e30, math.nan, math.inf, "x", None, [1]])
            label, setup = f"scale {scale!r}", (lambda wd: (wd / "l.gguf").write_bytes(good))
        yield Case(f"lora-files #{i} {label}", lambda wd, scale=scale: apply_lora(llm, wd / "l.gguf", scale),
                   setup=setup)
