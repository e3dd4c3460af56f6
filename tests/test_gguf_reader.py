"""GGUFReader against gguf-py's reader (the independent reference) on the default model and on
files written by gguf-py's own writer."""
from __future__ import annotations


import gguf
import numpy as np
import pytest

from llmrun.errors import GGUFError
from llmrun.gguf import GGMLType, GGUFReader, GGUFValueType, read_tensor
from llmrun.tensors import tensor_to_float32

# gguf-py's reader parses the vocabulary slowly: load the default model once per session.


@pytest.fixture(scope="session")
def ref_default(default_model):
    return gguf.GGUFReader(default_model)


@pytest.fixture(scope="module")
def ours_default(default_model):
    with GGUFReader(default_model) as r:
        yield r


def ref_metadata(ref: gguf.GGUFReader) -> dict:
    """{key: (value, GGUFValueType code, element type code or None)} as gguf-py reads it."""
    out = {}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):  # gguf-py's pseudo-fields for the header
            continue
        vtype = field.types[0]
        etype = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out[key] = (field.contents(), int(vtype), None if etype is None else int(etype))
    return out


def assert_same_metadata(ours: GGUFReader, ref: gguf.GGUFReader) -> None:
    expected = ref_metadata(ref)
    assert list(ours.metadata) == list(expected)  # file order kept
    for key, (value, vtype, etype) in expected.items():
        our_vtype, our_etype = ours.metadata_types[key]
        assert (int(our_vtype), None if our_etype is None else int(our_etype)) == (vtype, etype), key
        got = ours.metadata[key]
        if vtype == GGUFValueType.ARRAY and etype != GGUFValueType.STRING:
            assert isinstance(got, np.ndarray) and got.ndim == 1, key
            assert got.dtype.isnative, key
            if etype == GGUFValueType.BOOL:
                assert got.dtype == np.bool_
            np.testing.assert_array_equal(got, np.asarray(value), err_msg=key)
        elif vtype == GGUFValueType.ARRAY:
            assert got == list(value), key
        elif vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            assert isinstance(got, float) and got == float(value), key
        else:
            assert type(got) is type(value) and got == value, key


def assert_same_tensors(ours: GGUFReader, ref: gguf.GGUFReader) -> None:
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        ti = ours.tensors[t.name]
        assert int(ti.ggml_type) == int(t.tensor_type), t.name
        assert ti.shape == tuple(int(d) for d in reversed(t.shape)), t.name  # gguf-py: ne order
        assert ti.n_elements == int(t.n_elements) and ti.nbytes == int(t.n_bytes), t.name
        assert ti.offset == int(t.data_offset), t.name
        assert ti.data.dtype == np.uint8 and ti.data.shape[0] == ti.n_elements // ti.shape[-1]
        assert np.array_equal(ti.data.reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


# --- the default model ---------------------------------------------------------------------

def test_default_model_metadata_matches_gguf_py(ours_default, ref_default):
    assert ours_default.version == 3 and ours_default.alignment == 32
    assert_same_metadata(ours_default, ref_default)
    assert ours_default.get("llama.block_count") == 30
    assert ours_default.get("missing.key", 7) == 7
    assert len(ours_default.metadata["tokenizer.ggml.tokens"]) == 49152


def test_default_model_tensors_match_gguf_py(ours_default, ref_default):
    assert len(ours_default.tensors) == 272
    assert ours_default.data_offset == ref_default.data_offset
    assert_same_tensors(ours_default, ref_default)


def test_default_model_views_are_zero_copy(ours_default):
    data = ours_default.tensors["token_embd.weight"].data
    assert not data.flags.writeable and not data.flags.owndata
    assert data.shape == (49152, 576 // 32 * 34)


def test_dequantized_q8_0_and_f32_match_gguf_py(default_model, ref_default):
    for t in ref_default.tensors:
        if t.name in ("token_embd.weight", "output_norm.weight"):
            want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            got = read_tensor(default_model, t.name)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_read_tensor_unknown_name(default_model):
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        read_tensor(default_model, "nope")


# --- files written by gguf-py ----------------------------------------------------------------

def _every_value_type(w: gguf.GGUFWriter) -> None:
    V = gguf.GGUFValueType
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -120)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_bool("t.bool_t", True)
    w.add_bool("t.bool_f", False)
    w.add_string("t.str", "héllo\nwörld ✓")
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -2**63)
    w.add_float64("t.f64", 3.141592653589793)
    arrays = {
        V.UINT8: [0, 255, 7], V.INT8: [-128, 127], V.UINT16: [1, 65535], V.INT16: [-32768, 5],
        V.UINT32: [2**32 - 1, 0], V.INT32: [-1, 2], V.FLOAT32: [0.5, -1.25, 1e-5],
        V.BOOL: [True, False, True], V.UINT64: [2**64 - 1], V.INT64: [-(2**63), 1],
        V.FLOAT64: [1.0 / 3.0], V.STRING: ["a", "", "ü✓", "Ġ t"],
    }
    for etype, values in arrays.items():
        w.add_key_value(f"arr.{etype.name.lower()}", values, V.ARRAY, sub_type=etype)


def _raw(rng, qtype: GGMLType, rows: int, cols: int) -> np.ndarray:
    blck, size = qtype.block_size, qtype.type_size
    return rng.integers(0, 256, size=(rows, cols // blck * size), dtype=np.uint8)


@pytest.fixture(scope="module")
def gguf_py_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("ggufpy") / "all.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    _every_value_type(w)
    w.add_tensor("f32.weight", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f32.1d", rng.standard_normal(7).astype(np.float32))
    w.add_tensor("f16.weight", rng.standard_normal((2, 3, 4)).astype(np.float16))
    bf16 = rng.integers(0, 2**16, size=(4, 8), dtype=np.uint16).view(np.uint8)
    w.add_tensor("bf16.weight", bf16, raw_dtype=gguf.GGMLQuantizationType.BF16)
    for qname, shape in (("Q8_0", (3, 64)), ("Q4_0", (2, 32))):  # real blocks: finite scales
        qt = gguf.GGMLQuantizationType[qname]
        raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qt)
        w.add_tensor(f"{qname.lower()}.weight", raw, raw_dtype=qt)
    w.add_tensor("q4_k.4d", _raw(rng, GGMLType.Q4_K, 2 * 1 * 3, 256).reshape(2, 1, 3, -1),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_py_file_every_value_type(gguf_py_file):
    ref = gguf.GGUFReader(gguf_py_file)
    with GGUFReader(gguf_py_file) as ours:
        assert_same_metadata(ours, ref)
        assert_same_tensors(ours, ref)
        # spot checks of the Python types the contract promises
        assert ours.metadata["t.u64"] == 2**64 - 1 and ours.metadata["t.i64"] == -2**63
        assert ours.metadata["t.bool_t"] is True and ours.metadata["t.str"] == "héllo\nwörld ✓"
        assert ours.metadata["arr.string"] == ["a", "", "ü✓", "Ġ t"]
        assert ours.metadata["arr.float32"].dtype == np.float32
        assert ours.tensors["q4_k.4d"].shape == (2, 1, 3, 256)
        assert ours.tensors["f16.weight"].shape == (2, 3, 4)


def test_gguf_py_file_float_tensors_dequantize(gguf_py_file):
    ref = {t.name: t for t in gguf.GGUFReader(gguf_py_file).tensors}
    with GGUFReader(gguf_py_file) as ours:
        for name in ("f32.weight", "f32.1d", "f16.weight", "bf16.weight", "q8_0.weight", "q4_0.weight"):
            t = ref[name]
            want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
            got = tensor_to_float32(ours.tensors[name])
            assert got.dtype == np.float32 and got.shape == ours.tensors[name].shape
            np.testing.assert_array_equal(got.reshape(want.shape), want, err_msg=name)


def test_custom_alignment_from_gguf_py(tmp_path):
    path = tmp_path / "a64.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(3, dtype=np.float32))
    w.add_tensor("b", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFReader(path) as r:
        assert r.alignment == 64 and r.data_offset % 64 == 0
        assert all(ti.offset % 64 == 0 for ti in r.tensors.values())
        np.testing.assert_array_equal(tensor_to_float32(r.tensors["b"]), np.arange(5, dtype=np.float32))


def test_version_2_is_read(gguf_py_file, tmp_path):
    raw = bytearray(gguf_py_file.read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")
    path = tmp_path / "v2.gguf"
    path.write_bytes(raw)
    with GGUFReader(path) as r, GGUFReader(gguf_py_file) as r3:
        assert r.version == 2
        assert list(r.metadata) == list(r3.metadata)
        assert np.array_equal(r.tensors["q8_0.weight"].data, r3.tensors["q8_0.weight"].data)


def test_views_outlive_close(gguf_py_file):
    r = GGUFReader(gguf_py_file)
    view = r.tensors["f32.1d"].data
    arr = r.metadata["arr.int32"]
    r.close()
    assert view.size == 28 and arr.tolist() == [-1, 2]  # still valid: numpy keeps the mapping alive
    with pytest.raises(GGUFError, match="closed"):
        r.tensors["f32.1d"].data
