"""`llmrun info` and `llmrun quantize` on the default model; quantized files checked with gguf-py."""
from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from llmrun.cli import main
from llmrun.gguf import GGMLType, GGUFReader
from llmrun.quants.mixes import parse_file_type, plan_tensor_types


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


# --- info ----------------------------------------------------------------------------------------

def test_info_human(default_model):
    result = run("info", default_model)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^architecture\s+llama$", out, re.M)
    assert re.search(r"^file type\s+q4_1 \(3\)$", out, re.M)
    assert re.search(r"^\s+block_count\s+30$", out, re.M)
    assert re.search(r"^\s+embedding_length\s+576$", out, re.M)
    assert re.search(r"^parameters\s+134\.52 M", out, re.M)
    assert re.search(r"^file size\s+98\.36 MB", out, re.M)
    # long arrays summarized, long strings cut
    assert re.search(r"tokenizer\.ggml\.tokens\s+string\[49152\]\s+\[.*…\] \(49152 items\)", out)
    assert re.search(r"tokenizer\.chat_template\s+string\s+\".{80}…\" \(\d+ chars\)", out)
    table = re.findall(r"^\s+\d+\s+(\S+)\s+(\w+)\s+\[([\d, ]+)\]$", out, re.M)
    assert len(table) == 272
    rows = {name: (t, [int(d) for d in shape.split(",")]) for name, t, shape in table}
    assert rows["token_embd.weight"] == ("q8_0", [49152, 576])
    assert rows["blk.0.ffn_down.weight"] == ("q4_1", [576, 1536])
    assert rows["output_norm.weight"] == ("f32", [576])
    assert sum(t == "q4_1" for t, _ in rows.values()) == 210


def test_info_json(default_model, ref_default):
    result = run("info", default_model, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    ref = ref_default
    assert d["version"] == 3 and d["alignment"] == 32 and d["file_type"] == "q4_1"
    assert d["n_params"] == sum(int(t.n_elements) for t in ref.tensors)
    assert d["file_size"] == default_model.stat().st_size
    md = d["metadata"]
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert md["tokenizer.ggml.tokens"] == {"type": "string", "len": 49152}
    assert md["tokenizer.ggml.token_type"] == {"type": "int32", "len": 49152}
    assert list(md) == [k for k in ref.fields if not k.startswith("GGUF.")]
    assert [t["name"] for t in d["tensors"]] == [t.name for t in ref.tensors]
    for t, r in zip(d["tensors"], ref.tensors):
        assert t["type"] == r.tensor_type.name.lower()
        assert t["shape"] == [int(x) for x in reversed(r.shape)]


# --- quantize -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ref_default(default_model):
    return gguf.GGUFReader(default_model)  # slow to open (vocabulary): once per module


@pytest.fixture(scope="module")
def quantized(default_model, tmp_path_factory):
    """The default model re-quantized through the CLI, once per type for the whole module."""
    folder = tmp_path_factory.mktemp("quantized")
    out = {}
    for qtype in ("q8_0", "q4_k_m"):
        path = folder / f"model-{qtype}.gguf"
        result = run("quantize", default_model, path, "--type", qtype)
        assert result.exit_code == 0, result.output
        assert f"wrote {path}: {qtype}, 272 tensors" in result.stdout
        out[qtype] = path
    return out


def _plan(ref_in, qtype):
    fields = {k: f.contents() for k, f in ref_in.fields.items() if k.startswith("llama.")}
    return plan_tensor_types([(t.name, tuple(int(d) for d in reversed(t.shape))) for t in ref_in.tensors],
                             parse_file_type(qtype), n_layer=fields["llama.block_count"],
                             n_head=fields["llama.attention.head_count"],
                             n_head_kv=fields["llama.attention.head_count_kv"])


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


# worst relative RMS error allowed between the re-quantized and the original (q4_1) weights, per new
# type (measured: q8_0 0.006, q6_k 0.018, q4_k 0.020, q5_0 0.052; f32 and copied tensors exact)
TOLERANCE = {"f32": 0.0, "q8_0": 0.01, "q6_k": 0.03, "q4_k": 0.04, "q5_0": 0.08}


@pytest.mark.parametrize("qtype, ftype", [("q8_0", 7), ("q4_k_m", 15)])
def test_quantize_output_read_by_gguf_py(quantized, ref_default, qtype, ftype):
    ref_in = ref_default
    out = gguf.GGUFReader(quantized[qtype])
    # metadata: same keys in the same order with the same types and values, except the two it sets
    fin = {k: f for k, f in ref_in.fields.items() if not k.startswith("GGUF.")}
    fout = {k: f for k, f in out.fields.items() if not k.startswith("GGUF.")}
    assert list(fout) == list(fin)
    for key, f in fin.items():
        assert fout[key].types == f.types, key
        if key == "general.file_type":
            assert fout[key].contents() == ftype
        elif key == "general.quantization_version":
            assert fout[key].contents() == 2
        else:
            assert fout[key].contents() == f.contents(), key
    for key in ("general.file_type", "general.quantization_version"):
        assert fout[key].types == [gguf.GGUFValueType.UINT32]

    # tensor types as planned (norms f32), shapes unchanged
    plan = _plan(ref_in, qtype)
    tin = {t.name: t for t in ref_in.tensors}
    assert [t.name for t in out.tensors] == list(tin)
    for t in out.tensors:
        assert list(t.shape) == list(tin[t.name].shape), t.name
        assert GGMLType(int(t.tensor_type)) == plan[t.name], t.name
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32

    # dequantized weights (gguf-py's dequantizers) close to the original's
    sample = [t for t in out.tensors if re.match(r"(token_embd|blk\.(0|3|15|29)\.)", t.name)]
    for t in sample:  # a few layers (first, more-bits, middle, last): gguf-py's numpy is slow
        src = tin[t.name]
        want = gguf.quants.dequantize(np.asarray(src.data), src.tensor_type)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        assert got.shape == want.shape
        err = _rel_rms(got, want)
        assert err <= TOLERANCE[t.tensor_type.name.lower()], (t.name, t.tensor_type.name, err)
        if t.tensor_type == src.tensor_type:  # same type: llama.cpp copies the bytes
            assert np.array_equal(np.asarray(t.data), np.asarray(src.data)), t.name


def test_quantize_q4_k_m_uses_k_quants(quantized):
    with GGUFReader(quantized["q4_k_m"]) as r:
        types = {ti.ggml_type for ti in r.tensors.values()}
        assert r.get("general.file_type") == 15
    assert GGMLType.Q4_K in types and GGMLType.Q6_K in types  # 1536-wide ffn_down rows take k-quants


# --- quantize errors: one line, exit 1, nothing written ------------------------------------------

def test_quantize_refuses_existing_output(default_model, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run("quantize", default_model, out, "--type", "q8_0"), "already exists")
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_quantize_same_file(default_model, tmp_path):
    before = default_model.stat()
    assert_one_line_error(run("quantize", default_model, default_model, "--type", "q8_0", "--force"),
                          "same file")
    link = tmp_path / "link.gguf"
    link.symlink_to(default_model)
    assert_one_line_error(run("quantize", default_model, link, "--type", "q8_0", "--force"), "same file")
    after = default_model.stat()
    assert (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)


def test_quantize_unknown_type(default_model, tmp_path):
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("quantize", default_model, out, "--type", "q9_z"), "q9_z")
    assert not out.exists()


def test_quantize_unreadable_input(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))
    out = tmp_path / "out.gguf"
    assert_one_line_error(run("quantize", bad, out, "--type", "q8_0"), str(bad))
    assert_one_line_error(run("quantize", tmp_path / "missing.gguf", out, "--type", "q8_0"), "missing.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
