"""Hostile model files (issue 10, defects 3, 4, 5 and the vocabulary-size part of 9): each ends in one
LlmrunError line naming what is wrong, before any large allocation, never a traceback or a NaN stream.

The files are tiny complete models (helpers/tiny_files.py) with one thing broken.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.limits import outcomes, run_limited
from helpers.tiny_files import rewrite, tiny_vocab, write_model
from llmrun.api import Llama
from llmrun.errors import LlmrunError, ModelError, TokenizerError
from llmrun.gguf import GGMLType, GGUFValueType as VT

U32, I32, F32, STR, ARR, BOOL = VT.UINT32, VT.INT32, VT.FLOAT32, VT.STRING, VT.ARRAY, VT.BOOL


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("model") / "base.gguf")


def _load_error(path, match, kind=LlmrunError):
    with pytest.raises(kind) as e:
        Llama(str(path), n_ctx=64)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_the_base_file_runs(base):
    out = Llama(str(base), n_ctx=64).create_completion("hello", max_tokens=3, temperature=0)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


# --- 3. tiny inputs, huge allocations --------------------------------------------------------------------------
def test_huge_block_count_fails_before_allocating(base, tmp_path):
    bad = rewrite(base, tmp_path / "layers.gguf", set_keys={"llama.block_count": (2_000_000_000, U32, None)})
    body = f"""
        try:
            Llama({str(bad)!r}, n_ctx=64)
            print(json.dumps({{"outcome": "loaded"}}))
        except LlmrunError as e:
            print(json.dumps({{"outcome": type(e).__name__ + ": " + str(e)}}))
    """
    res = outcomes(run_limited("import json\nfrom llmrun.api import Llama\nfrom llmrun.errors import LlmrunError",
                               body, extra_mb=400))
    assert res["outcome"].startswith("ModelError") and "llama.block_count" in res["outcome"], res


def test_huge_vocabulary_is_refused_quickly(tmp_path):
    tokens = [f"t{i}" for i in range(1_100_000)]
    p = write_model(tmp_path / "vocab.gguf", set_keys={"tokenizer.ggml.tokens": (tokens, ARR, STR),
                                                      "tokenizer.ggml.token_type": (np.ones(len(tokens), np.int32),
                                                                                    ARR, I32)})
    _load_error(p, "more than the", TokenizerError)


def test_context_larger_than_memory_is_refused(base):
    with pytest.raises(LlmrunError, match="KV cache"):
        Llama(str(base), n_ctx=2**31)


# --- 4. NaN / Inf ---------------------------------------------------------------------------------------------
def _with_tensor(base, tmp_path, name, values: np.ndarray):
    return rewrite(base, tmp_path / "t.gguf", tensor_bytes={name: np.ascontiguousarray(values, np.float32).tobytes()})


@pytest.mark.parametrize("name", ["blk.0.attn_norm.weight", "output_norm.weight", "blk.1.ffn_norm.weight"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_norm_weights_refused_at_load(base, tmp_path, name, bad):
    v = np.ones(32, np.float32)
    v[3] = bad
    _load_error(_with_tensor(base, tmp_path, name, v), name, ModelError)


def test_non_finite_f32_matrix_refused_at_load(base, tmp_path):
    from llmrun.gguf import read_tensor
    w = read_tensor(base, "blk.0.ffn_up.weight")
    w[5, 7] = np.nan
    _load_error(_with_tensor(base, tmp_path, "blk.0.ffn_up.weight", w), "blk.0.ffn_gate.weight/blk.0.ffn_up.weight")


@pytest.mark.parametrize("qtype,block,scale_at", [("q8_0", 34, 0), ("q4_1", 20, 2), ("q4_0", 18, 0)])
def test_nan_block_scale_refused_at_load(tmp_path, qtype, block, scale_at):
    from llmrun.gguf import GGUFReader
    p = write_model(tmp_path / "q.gguf", qtype=qtype)
    with GGUFReader(p) as r:
        raw = bytearray(r.tensors["blk.1.attn_v.weight"].data.tobytes())
    at = block * 3 + scale_at                                 # the fp16 scale (or min) of block 3
    raw[at:at + 2] = struct.pack("<e", np.nan)
    bad = rewrite(p, tmp_path / "nan_scale.gguf", tensor_bytes={"blk.1.attn_v.weight": bytes(raw)})
    _load_error(bad, "blk.1.attn_v.weight", ModelError)


@pytest.mark.parametrize("eps", [float("nan"), 0.0, -1e-5, float("inf")])
def test_bad_rms_eps_refused(base, tmp_path, eps):
    bad = rewrite(base, tmp_path / "eps.gguf", set_keys={"llama.attention.layer_norm_rms_epsilon": (eps, F32, None)})
    _load_error(bad, "layer_norm_rms_epsilon", ModelError)


def test_overflowing_weights_end_in_one_line_at_run_time(base, tmp_path):
    """Finite but huge weights overflow to Inf/NaN inside the graph: the logits guard turns that into a
    ModelError instead of a ZeroDivisionError from the kernels or a stream of garbage."""
    from llmrun.gguf import read_tensor
    out = read_tensor(base, "output.weight") * np.float32(1e30)     # times 1e30 norm weights: overflow
    huge = rewrite(base, tmp_path / "huge.gguf", tensor_bytes={
        "output.weight": out.tobytes(), "output_norm.weight": np.full(32, 1e30, np.float32).tobytes()})
    llm = Llama(str(huge), n_ctx=64)
    with pytest.raises(ModelError, match="NaN or Inf logits"):
        llm.create_completion("hello world", max_tokens=2)
    with pytest.raises(ModelError, match="NaN or Inf logits"):
        llm.eval_logits([5, 6, 7])


# --- 5. metadata of the wrong type -----------------------------------------------------------------------------
WRONG_TYPES = {
    "embedding_length_array": ("llama.embedding_length", (np.array([32, 32], np.uint32), ARR, U32)),
    "block_count_string": ("llama.block_count", ("2", STR, None)),
    "head_count_string_array": ("llama.attention.head_count", (["4", "4"], ARR, STR)),
    "head_count_wrong_length": ("llama.attention.head_count", (np.array([4, 4, 4], np.uint32), ARR, U32)),
    "eps_string": ("llama.attention.layer_norm_rms_epsilon", ("1e-5", STR, None)),
    "freq_base_string": ("llama.rope.freq_base", ("abc", STR, None)),
    "scaling_type_int": ("llama.rope.scaling.type", (3, U32, None)),
    "bos_array": ("tokenizer.ggml.bos_token_id", (np.array([1, 2], np.uint32), ARR, U32)),
    "eos_string": ("tokenizer.ggml.eos_token_id", ("2", STR, None)),
    "tokens_int32": ("tokenizer.ggml.tokens", (np.arange(279, dtype=np.int32), ARR, I32)),
    "tokens_string": ("tokenizer.ggml.tokens", ("abc", STR, None)),
    "merges_ints": ("tokenizer.ggml.merges", (np.arange(5, dtype=np.int32), ARR, I32)),
    "pre_array": ("tokenizer.ggml.pre", (["smollm"], ARR, STR)),
    "model_array": ("tokenizer.ggml.model", (["gpt2"], ARR, STR)),
    "token_type_strings": ("tokenizer.ggml.token_type", (["1"] * 279, ARR, STR)),
    "add_bos_string": ("tokenizer.ggml.add_bos_token", ("maybe", STR, None)),
    "add_bos_array": ("tokenizer.ggml.add_bos_token", (np.array([1], np.uint8), ARR, VT.UINT8)),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_metadata_type_is_one_line(base, tmp_path, case):
    key, value = WRONG_TYPES[case]
    bad = rewrite(base, tmp_path / f"{case}.gguf", set_keys={key: value})
    _load_error(bad, key)


@pytest.mark.parametrize("case", ["embedding_length_array", "tokens_int32", "eps_string"])
def test_wrong_metadata_type_cli_one_line(base, tmp_path, case):
    from llmrun.cli import main
    key, value = WRONG_TYPES[case]
    bad = rewrite(base, tmp_path / f"{case}.gguf", set_keys={key: value})
    for args in (["run", str(bad), "-p", "hi", "-n", "2"], ["info", str(bad)], ["info", str(bad), "--json"]):
        res = CliRunner().invoke(main, args)
        if args[0] == "info":
            assert res.exit_code == 0, res.output      # info describes whatever the file holds
            continue
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], \
            res.stderr


def test_false_string_is_false(base, tmp_path):
    bad = rewrite(base, tmp_path / "false.gguf", set_keys={"tokenizer.ggml.add_bos_token": ("false", STR, None)})
    assert Llama(str(bad), vocab_only=True).tokenize(b"hello")[:1] != [1]


@pytest.mark.parametrize("keys,match", [
    ({"llama.rope.freq_base": (1.0, F32, None)}, "freq_base"),
    ({"llama.rope.scaling.yarn_beta_fast": (0.0, F32, None)}, "yarn_beta_fast"),
    ({"llama.rope.scaling.yarn_beta_slow": (-1.0, F32, None)}, "yarn_beta_slow"),
    ({"llama.rope.scaling.original_context_length": (0, U32, None)}, "original_context_length"),
])
def test_yarn_parameters_that_divide_by_zero(base, tmp_path, keys, match):
    yarn = {"llama.rope.scaling.type": ("yarn", STR, None), "llama.rope.scaling.factor": (4.0, F32, None),
            "llama.rope.scaling.original_context_length": (64, U32, None), **keys}
    _load_error(rewrite(base, tmp_path / "yarn.gguf", set_keys=yarn), match, ModelError)


def test_vocabulary_that_made_hf_tokenizers_panic(base, tmp_path):
    """With this vocabulary, merge "ĠĠ 1RK" (multi-byte parts, result not a token) makes tokenizers panic while
    it builds the BPE model: pyo3's PanicException, a BaseException that `except Exception` misses. Merges
    that cannot make a token are now left out, and a panic that remains is caught as a TokenizerError."""
    tokens = ["<s>", "1F", "1RK", "Y", "FF", "YF>", "ĠĠ"]
    tokens += [f"p{i}" for i in range(len(tiny_vocab()[0]) - len(tokens))]   # as many as embedding rows
    bad = rewrite(base, tmp_path / "panic.gguf", set_keys={"tokenizer.ggml.tokens": (tokens, ARR, STR),
                                                          "tokenizer.ggml.merges": (["ĠĠ 1RK"], ARR, STR)})
    llm = Llama(str(bad), vocab_only=True)
    assert llm.tokenize(b"YF>Y", add_bos=False) == [3, 3]    # only "Y" is a single-character token here


def test_tokenizer_panic_is_caught(monkeypatch):
    """Whatever else makes the library panic ends as one TokenizerError, not a BaseException traceback."""
    import llmrun.text.tokenizer_bpe as bpe

    class PanicException(BaseException):     # what pyo3 raises: same name, a BaseException
        pass

    def panicking_bpe(*args, **kwargs):
        raise PanicException("range end index 7 out of range for slice of length 4")

    import tokenizers.models
    monkeypatch.setattr(tokenizers.models, "BPE", panicking_bpe)
    with pytest.raises(TokenizerError, match="range end index"):
        bpe.BpeEncoder(["a", "b"], [], bpe.PRE_TOKENIZERS["gpt-2"])


def test_vocabulary_size_must_match_the_embedding(base, tmp_path):
    tokens, types, _ = tiny_vocab()
    extra = [f"x{i}" for i in range(5)]
    bad = rewrite(base, tmp_path / "vocab.gguf", set_keys={
        "tokenizer.ggml.tokens": (tokens + extra, ARR, STR),
        "tokenizer.ggml.token_type": (np.asarray(types + [1] * 5, np.int32), ARR, I32)})
    _load_error(bad, "token_embd.weight has", ModelError)


def test_raw_tensor_type_the_engine_cannot_run(tmp_path):
    """Not new, but part of the same promise: an unsupported tensor type is a one-line ModelError."""
    n_vocab = len(tiny_vocab()[0])
    p = write_model(tmp_path / "x.gguf",
                    raw_tensors={"output.weight": (np.zeros(n_vocab * 17, np.uint8), GGMLType.MXFP4, (n_vocab, 32))})
    _load_error(p, "output.weight")
