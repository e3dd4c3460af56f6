"""`llmrun convert-lora`: PEFT adapters as llama.cpp GGUF LoRA files, read back with gguf-py.
The deltas the file encodes under llama.cpp's rule (alpha/r * B @ A) equal PEFT's merge, permuted."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_hf import expected_gguf_tensors, make_lora, make_tiny_llama, merged_reference, permute_qk_reference

import gguf  # dev dependency; a missing one must fail, not skip
from safetensors.numpy import load_file

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama2_tokenizer_model):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, seed=30)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tied", tokenizer="bpe", tied=True, seed=31)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "plain": make_lora(base, root / "plain", r=4, alpha=8, seed=1),
        "rs_patterns": make_lora(base, root / "rs", r=8, alpha=4, use_rslora=True,
                                 targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                                 rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                 alpha_pattern={"q_proj": 16}, seed=2),
        "embedding": make_lora(base, root / "emb", r=4, alpha=4, targets=("embed_tokens", "lm_head", "gate_proj"),
                               seed=3),
    }


def _convert(args):
    from llmrun.cli import main
    return CliRunner().invoke(main, ["convert-lora", *map(str, args)])


def _ok(args):
    res = _convert(args)
    assert res.exit_code == 0, res.output
    return gguf.GGUFReader(str(args[args.index("-o") + 1]))


def _field(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


def test_plain_lora_as_llama_cpp_writes_it(base, adapters, tmp_path):
    """Metadata, names, ne order and values: A verbatim, B verbatim with Q/K rows permuted per head."""
    r = _ok([adapters["plain"], "-o", tmp_path / "a.gguf", "--base", base])
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "adapter.lora.alpha") == 8.0
    cfg = json.loads((base / "config.json").read_text())
    peft = load_file(str(adapters["plain"] / "adapter_model.safetensors"))
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    tensors = {t.name: t for t in r.tensors}
    want_names = set()
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in table.items():
            a = peft[f"base_model.model.model.layers.{i}.{hf}.lora_A.weight"]
            b = peft[f"base_model.model.model.layers.{i}.{hf}.lora_B.weight"]
            if g == "attn_q":
                b = permute_qk_reference(b, cfg["num_attention_heads"])
            elif g == "attn_k":
                b = permute_qk_reference(b, cfg["num_key_value_heads"])
            ta, tb = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            assert list(ta.shape) == [a.shape[1], a.shape[0]] and list(tb.shape) == [b.shape[1], b.shape[0]]  # ne
            assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(ta.data), a)
            np.testing.assert_array_equal(np.asarray(tb.data), b)
            want_names |= {ta.name, tb.name}
    assert set(tensors) == want_names


def _file_deltas(r) -> dict[str, np.ndarray]:
    """Base GGUF name -> the delta llama.cpp applies for this file at scale 1 (formats.md §7b)."""
    alpha = float(_field(r, "adapter.lora.alpha"))
    t = {x.name: np.asarray(gguf.quants.dequantize(x.data, x.tensor_type), dtype=np.float64) for x in r.tensors}
    out = {}
    for name in t:
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            a, b = t[name], t[base + ".lora_b"]
            s = alpha / b.shape[1]
            out[base] = s * (a @ b.T if base == "token_embd.weight" else b @ a)
    return out


@pytest.mark.parametrize("kind", ["plain", "rs_patterns", "embedding"])
def test_deltas_equal_peft_merge(base, adapters, tmp_path, kind):
    r = _ok([adapters[kind], "-o", tmp_path / "a.gguf", "--base", base])
    before = expected_gguf_tensors(merged_reference(base))
    after = expected_gguf_tensors(merged_reference(base, [(adapters[kind], 1.0)]))
    changed = {n for n in after if not np.array_equal(after[n], before[n])}
    deltas = _file_deltas(r)
    assert set(deltas) == changed
    for n, d in deltas.items():
        np.testing.assert_allclose(d, after[n].astype(np.float64) - before[n], rtol=0, atol=2e-6, err_msg=n)


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_f16_and_q8_0(base, adapters, tmp_path, out_type):
    """Each 2-D tensor in the type, q8_0 falling back to f16 for rows that are not whole 32-blocks (the rank-4
    B's), as llama.cpp's converter does; values are gguf-py's conversion of the f32 file's."""
    ref = _ok([adapters["plain"], "-o", tmp_path / "f32.gguf", "--base", base])
    r = _ok([adapters["plain"], "-o", tmp_path / "q.gguf", "--base", base, "--type", out_type])
    want_type = gguf.GGMLQuantizationType.Q8_0 if out_type == "q8_0" else gguf.GGMLQuantizationType.F16
    f32 = {t.name: np.asarray(t.data) for t in ref.tensors}
    for t in r.tensors:
        rows = f32[t.name].shape[1]
        expect = want_type if want_type != gguf.GGMLQuantizationType.Q8_0 or rows % 32 == 0 else \
            gguf.GGMLQuantizationType.F16
        assert t.tensor_type == expect, t.name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1).view(np.uint8),
                                      gguf.quants.quantize(f32[t.name], expect).reshape(-1).view(np.uint8))


def _fail(args, expect):
    res = _convert(args)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert expect in lines[0], lines[0]


def _with_base_path(adapter, dst, base_path):
    shutil.copytree(adapter, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_path
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_errors(base, tied_base, adapters, tmp_path):
    out = tmp_path / "o" / "a.gguf"
    out.parent.mkdir()
    # a hub id (not a local folder) as the base: Q/K need the head counts, embeddings the tie
    _fail([_with_base_path(adapters["plain"], tmp_path / "p", "org/model"), "-o", out], "--base")
    _fail([_with_base_path(adapters["embedding"], tmp_path / "e", "org/model"), "-o", out], "--base")
    _fail([adapters["plain"], "-o", out, "--base", base, "--type", "q4_0"], "q4_0")
    _fail([tmp_path / "nope", "-o", out], "not found")
    other = make_tiny_llama(tmp_path / "other", tokenizer="bpe", seed=32, num_hidden_layers=1)
    _fail([adapters["plain"], "-o", out, "--base", other], "different base")
    wide = make_tiny_llama(tmp_path / "wide", tokenizer="bpe", seed=33, hidden_size=128)
    _fail([adapters["plain"], "-o", out, "--base", wide], "different base")
    mts = make_lora(base, tmp_path / "mts", targets=("q_proj",), modules_to_save=["lm_head"], seed=4)
    _fail([mts, "-o", out, "--base", base], "modules_to_save")
    tied = make_lora(tied_base, tmp_path / "tied", targets=("q_proj", "lm_head"), seed=5)
    _fail([tied, "-o", out, "--base", tied_base], "tied")
    assert not list(out.parent.iterdir())
    out.write_bytes(b"keep")
    _fail([adapters["plain"], "-o", out, "--base", base], "--force")
    assert out.read_bytes() == b"keep"
    assert _convert([adapters["plain"], "-o", out, "--base", base, "--force"]).exit_code == 0


def test_adapter_without_qk_needs_no_base(base, tmp_path):
    v_only = _with_base_path(make_lora(base, tmp_path / "v", targets=("v_proj", "up_proj"), seed=6),
                             tmp_path / "v2", "org/model")
    r = _ok([v_only, "-o", tmp_path / "v.gguf"])
    assert {t.name.split(".")[2] for t in r.tensors} == {"attn_v", "ffn_up"}


def test_base_from_adapter_config(base, adapters, tmp_path):
    """Without --base, a local base_model_name_or_path in adapter_config.json is used."""
    a = _ok([_with_base_path(adapters["plain"], tmp_path / "ad", str(base)), "-o", tmp_path / "a.gguf"])
    b = _ok([adapters["plain"], "-o", tmp_path / "b.gguf", "--base", base])
    for x, y in zip(a.tensors, b.tensors):
        assert x.name == y.name and np.array_equal(np.asarray(x.data), np.asarray(y.data))
