"""Test-only: tiny complete model files built in milliseconds (numpy random weights, a byte-level BPE vocabulary
with ChatML control tokens), written with llmrun's own GGUFWriter. They are *inputs* for tests that check how
llmrun reacts to broken or hostile files (the expected behaviour is an error or a run, never a value copied
from our output), so using our writer to make them is fine; the numeric references live in tiny_gguf.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llmrun.gguf import GGMLType, GGUFReader, GGUFValueType as VT, GGUFWriter
from llmrun.text.tokenizer_bpe import byte_to_char

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
MERGE_WORDS = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "ld", "Ġworld", "in", "Ġin", "er", "Ġt", "th",
               "Ġth", "Ġthe", "an", "Ġa", "on", "es"]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): specials first, then the 256 byte characters, then a few merges."""
    chars = [byte_to_char()[b] for b in range(256)]
    tokens, merges = SPECIALS + chars, []
    for word in MERGE_WORDS:
        for cut in range(1, len(word)):
            a, b = word[:cut], word[cut:]
            if a in tokens and b in tokens and word not in tokens:
                merges.append(f"{a} {b}")
                tokens.append(word)
                break
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def model_metadata(n_layer: int = 2, n_embd: int = 32, n_head: int = 4, n_head_kv: int = 2, n_ff: int = 64,
                   n_ctx_train: int = 256, eps: float = 1e-5) -> list[tuple]:
    tokens, types, merges = tiny_vocab()
    return [
        ("general.architecture", "llama", VT.STRING, None),
        ("general.name", "tiny", VT.STRING, None),
        ("llama.block_count", n_layer, VT.UINT32, None),
        ("llama.context_length", n_ctx_train, VT.UINT32, None),
        ("llama.embedding_length", n_embd, VT.UINT32, None),
        ("llama.feed_forward_length", n_ff, VT.UINT32, None),
        ("llama.attention.head_count", n_head, VT.UINT32, None),
        ("llama.attention.head_count_kv", n_head_kv, VT.UINT32, None),
        ("llama.attention.layer_norm_rms_epsilon", eps, VT.FLOAT32, None),
        ("llama.rope.freq_base", 10000.0, VT.FLOAT32, None),
        ("tokenizer.ggml.model", "gpt2", VT.STRING, None),
        ("tokenizer.ggml.pre", "smollm", VT.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.token_type", np.asarray(types, np.int32), VT.ARRAY, VT.INT32),
        ("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING),
        ("tokenizer.ggml.bos_token_id", 1, VT.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, VT.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, VT.BOOL, None),
        ("tokenizer.chat_template", CHATML, VT.STRING, None),
    ]


def model_tensors(n_vocab: int, n_layer: int = 2, n_embd: int = 32, n_head: int = 4, n_head_kv: int = 2,
                  n_ff: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights (numpy order) of a random LLaMA of these dimensions."""
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": mat(n_vocab, n_embd), "output_norm.weight": norm(n_embd),
         "output.weight": mat(n_vocab, n_embd)}
    for i in range(n_layer):
        b = f"blk.{i}."
        t.update({b + "attn_norm.weight": norm(n_embd), b + "attn_q.weight": mat(n_head * hd, n_embd),
                  b + "attn_k.weight": mat(n_head_kv * hd, n_embd), b + "attn_v.weight": mat(n_head_kv * hd, n_embd),
                  b + "attn_output.weight": mat(n_embd, n_head * hd), b + "ffn_norm.weight": norm(n_embd),
                  b + "ffn_gate.weight": mat(n_ff, n_embd), b + "ffn_up.weight": mat(n_ff, n_embd),
                  b + "ffn_down.weight": mat(n_embd, n_ff)})
    return t


def write_model(path, *, metadata: list[tuple] | None = None, set_keys: dict | None = None,
                drop_keys: tuple[str, ...] = (), tensors: dict[str, np.ndarray] | None = None,
                qtype: str = "f32", raw_tensors: dict | None = None, seed: int = 0, **dims) -> Path:
    """A complete tiny model file. set_keys: {key: (value, vtype, elem_type)} replaces or adds KVs;
    raw_tensors: {name: (uint8 bytes, GGMLType, shape)} replaces a tensor with raw bytes of any type."""
    meta = metadata if metadata is not None else model_metadata(**dims)
    set_keys = dict(set_keys or {})
    w = GGUFWriter(path, overwrite=True)
    for key, value, vtype, elem in meta:
        if key in drop_keys:
            continue
        if key in set_keys:
            value, vtype, elem = set_keys.pop(key)
        w.add(key, value, vtype, elem)
    for key, (value, vtype, elem) in set_keys.items():
        w.add(key, value, vtype, elem)
    n_vocab = len(tiny_vocab()[0])
    if tensors is None:
        tensors = model_tensors(n_vocab, seed=seed, **dims)
    raw_tensors = raw_tensors or {}
    for name, arr in tensors.items():
        if name in raw_tensors:
            data, gtype, shape = raw_tensors[name]
            w.add_tensor(name, shape, gtype, data)
        elif arr.ndim == 1 or qtype == "f32":
            w.add_tensor(name, arr.shape, GGMLType.F32, np.ascontiguousarray(arr, np.float32))
        else:
            from llmrun.quants import quantize
            w.add_tensor(name, arr.shape, GGMLType.from_name(qtype), quantize(arr, qtype))
    w.write()
    return Path(path)


def rewrite(src, dst, *, set_keys: dict | None = None, drop_keys: tuple[str, ...] = (),
            tensor_bytes: dict[str, bytes] | None = None) -> Path:
    """A copy of GGUF file `src` with some KVs replaced/added/dropped, or some tensors' raw bytes replaced."""
    set_keys = dict(set_keys or {})
    tensor_bytes = tensor_bytes or {}
    with GGUFReader(src) as r:
        w = GGUFWriter(dst, overwrite=True, alignment=r.alignment)
        for key, value in r.metadata.items():
            if key in drop_keys:
                continue
            if key in set_keys:
                value, vtype, elem = set_keys.pop(key)
            else:
                vtype, elem = r.metadata_types[key]
            w.add(key, value, vtype, elem)
        for key, (value, vtype, elem) in set_keys.items():
            w.add(key, value, vtype, elem)
        for ti in r.tensors.values():
            data = ti.data.reshape(-1).copy()
            if ti.name in tensor_bytes:
                data = np.frombuffer(tensor_bytes[ti.name], np.uint8).copy()
            w.add_tensor(ti.name, ti.shape, ti.ggml_type, data)
        w.write()
    return Path(dst)
