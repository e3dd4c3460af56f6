"""GGUFWriter: gguf-py reads what we write, output is byte-identical to gguf-py's writer,
writes are streamed, atomic and validated."""
from __future__ import annotations

import filecmp
import os

import gguf
import numpy as np
import pytest

from llmrun.errors import GGUFError, LlmrunError
from llmrun.gguf import GGMLType, GGUFReader, GGUFValueType as V, GGUFWriter

SCALARS = [
    ("t.u8", 250, V.UINT8), ("t.i8", -120, V.INT8), ("t.u16", 65000, V.UINT16), ("t.i16", -32000, V.INT16),
    ("t.u32", 4_000_000_000, V.UINT32), ("t.i32", -2_000_000_000, V.INT32), ("t.f32", 1e-5, V.FLOAT32),
    ("t.bool", True, V.BOOL), ("t.str", "héllo\nwörld ✓", V.STRING), ("t.u64", 2**64 - 1, V.UINT64),
    ("t.i64", -2**63, V.INT64), ("t.f64", 3.141592653589793, V.FLOAT64),
]
ARRAYS = [
    (V.UINT8, [0, 255, 7]), (V.INT8, [-128, 127]), (V.UINT16, [1, 65535]), (V.INT16, [-32768, 5]),
    (V.UINT32, [2**32 - 1, 0]), (V.INT32, [-1, 2]), (V.FLOAT32, [0.5, -1.25, 1e-5]),
    (V.BOOL, [True, False, True]), (V.UINT64, [2**64 - 1]), (V.INT64, [-(2**63), 1]),
    (V.FLOAT64, [1.0 / 3.0]), (V.STRING, ["a", "", "ü✓", "Ġ t"]),
]


def _tensors(rng):
    """(name, numpy shape, type, data for our writer, data for gguf-py, gguf-py raw_dtype)."""
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((2, 3, 4)).astype(np.float16)
    bf16 = rng.integers(0, 2**16, size=(4, 8), dtype=np.uint16)
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    q4k = rng.integers(0, 256, size=(2, 144), dtype=np.uint8)
    return [
        ("f32.weight", (3, 5), GGMLType.F32, f32, f32, None),
        ("f32.1d", (7,), GGMLType.F32, np.arange(7, dtype=np.float32), np.arange(7, dtype=np.float32), None),
        ("f16.weight", (2, 3, 4), GGMLType.F16, f16, f16, None),
        ("bf16.weight", (4, 8), GGMLType.BF16, bf16.view(np.uint8), bf16.view(np.uint8),
         gguf.GGMLQuantizationType.BF16),
        ("q8_0.weight", (3, 64), GGMLType.Q8_0, q8, q8, gguf.GGMLQuantizationType.Q8_0),
        ("q4_k.weight", (2, 256), GGMLType.Q4_K, q4k, q4k, gguf.GGMLQuantizationType.Q4_K),
    ]


def _write_ours(path, rng, alignment=32, callables=False):
    w = GGUFWriter(path, alignment=alignment)
    w.add("general.architecture", "llama", V.STRING)
    if alignment != 32:
        w.add("general.alignment", alignment, V.UINT32)
    for key, value, vtype in SCALARS:
        w.add(key, value, vtype)
    for etype, values in ARRAYS:
        w.add(f"arr.{etype.name.lower()}", values, V.ARRAY, etype)
    for name, shape, qtype, data, _, _ in _tensors(rng):
        w.add_tensor(name, shape, qtype, (lambda d=data: d) if callables else data)
    w.write()


def _write_gguf_py(path, rng, alignment=32):
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment != 32:
        w.add_custom_alignment(alignment)
    for key, value, vtype in SCALARS:
        w.add_key_value(key, value, gguf.GGUFValueType(int(vtype)))
    for etype, values in ARRAYS:
        w.add_key_value(f"arr.{etype.name.lower()}", values, gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType(int(etype)))
    for name, _, _, _, data, raw_dtype in _tensors(rng):
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [32, 64])
def test_byte_identical_to_gguf_py_writer(tmp_path, alignment):
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    _write_ours(ours, np.random.default_rng(5), alignment)
    _write_gguf_py(theirs, np.random.default_rng(5), alignment)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size % alignment == 0  # padded after the last tensor too


def test_gguf_py_reads_what_we_write(tmp_path):
    path = tmp_path / "ours.gguf"
    _write_ours(path, np.random.default_rng(6), callables=True)
    ref = gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    for key, value, vtype in SCALARS:
        assert fields[key].types == [gguf.GGUFValueType(int(vtype))], key
        got = fields[key].contents()
        assert got == (pytest.approx(value, rel=1e-7) if vtype == V.FLOAT32 else value), key
    for etype, values in ARRAYS:
        f = fields[f"arr.{etype.name.lower()}"]
        assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(etype))]
        got = f.contents()
        if etype == V.FLOAT32:
            np.testing.assert_allclose(got, values, rtol=1e-7)
        else:
            assert list(got) == values
    by_name = {t.name: t for t in ref.tensors}
    for name, shape, qtype, data, _, _ in _tensors(np.random.default_rng(6)):
        t = by_name[name]
        assert int(t.tensor_type) == int(qtype)
        assert tuple(reversed([int(d) for d in t.shape])) == shape
        assert np.asarray(t.data).tobytes() == np.ascontiguousarray(data).tobytes(), name


def test_empty_arrays_and_no_tensors_round_trip(tmp_path):
    path = tmp_path / "e.gguf"
    w = GGUFWriter(path)
    w.add("general.architecture", "llama", V.STRING)
    w.add("e.str", [], V.ARRAY, V.STRING)
    w.add("e.i32", [], V.ARRAY, V.INT32)
    w.add("e.np", np.array([1.5, 2.5], dtype=np.float64), V.ARRAY, V.FLOAT32)
    w.write()
    ref = gguf.GGUFReader(path)
    assert list(ref.fields["e.np"].contents()) == [1.5, 2.5]
    with GGUFReader(path) as r:
        assert r.metadata["e.str"] == [] and r.metadata["e.i32"].size == 0 and not r.tensors
        assert r.metadata_types["e.i32"] == (V.ARRAY, V.INT32)


def test_rewrite_of_default_model_is_byte_identical(default_model, tmp_path):
    # Our reader + writer reproduce a llama.cpp-ecosystem file exactly, streaming from the map.
    out = tmp_path / "copy.gguf"
    with GGUFReader(default_model) as r:
        w = GGUFWriter(out, alignment=r.alignment)
        for key, value in r.metadata.items():
            w.add(key, value, *r.metadata_types[key])
        for ti in r.tensors.values():
            w.add_tensor(ti.name, ti.shape, ti.ggml_type, lambda ti=ti: ti.data)
        w.write()
    assert filecmp.cmp(out, default_model, shallow=False)


# --- atomicity ---------------------------------------------------------------------------------

def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failing_data_callable_leaves_target_untouched(tmp_path, exc):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"previous contents")

    def explode():
        raise exc

    w = GGUFWriter(target, overwrite=True)
    w.add("general.architecture", "llama", V.STRING)
    w.add_tensor("a", (4,), GGMLType.F32, np.zeros(4, np.float32))
    w.add_tensor("b", (1 << 20,), GGMLType.F32, explode)
    with pytest.raises(type(exc)):
        w.write()
    assert target.read_bytes() == b"previous contents"
    assert _leftovers(tmp_path, {"model.gguf"}) == []


def test_bad_data_from_callable_is_caught_before_writing_it(tmp_path):
    target = tmp_path / "m.gguf"
    w = GGUFWriter(target)
    w.add_tensor("a", (2, 32), GGMLType.Q8_0, lambda: np.zeros((2, 33), np.uint8))
    with pytest.raises(GGUFError, match=r"tensor 'a'.*needs 68 bytes, data has 66"):
        w.write()
    assert _leftovers(tmp_path, set()) == []


def test_existing_target_needs_overwrite(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    w = GGUFWriter(target)
    w.add("k", 1, V.UINT32)
    with pytest.raises(LlmrunError, match="already exists"):
        w.write()
    assert target.read_bytes() == b"keep me"
    assert _leftovers(tmp_path, {"m.gguf"}) == []
    w2 = GGUFWriter(target, overwrite=True)
    w2.add("k", 1, V.UINT32)
    w2.write()
    with GGUFReader(target) as r:
        assert r.metadata == {"k": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_missing_folder(tmp_path):
    w = GGUFWriter(tmp_path / "no" / "such" / "m.gguf")
    with pytest.raises(LlmrunError, match="does not exist"):
        w.write()


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, vtype, etype, message", [
    ("a", 256, V.UINT8, None, "does not fit in uint8"),
    ("a", -1, V.UINT32, None, "does not fit in uint32"),
    ("a", 1.5, V.INT32, None, "not an integer"),
    ("a", "x", V.FLOAT32, None, "not a number"),
    ("a", 2, V.BOOL, None, "not a bool"),
    ("a", 5, V.STRING, None, "expected a string"),
    ("a", [1, 2], V.ARRAY, None, "explicit element type"),
    ("a", [[1]], V.ARRAY, V.ARRAY, "nested"),
    ("a", [1, 70000], V.ARRAY, V.INT16, "do not fit in int16"),
    ("a", ["x"], V.ARRAY, V.INT32, "not integers"),
    ("a", 1, 13, None, "unknown value type"),
    ("", 1, V.UINT32, None, "non-empty"),
])
def test_bad_values_are_refused(tmp_path, key, value, vtype, etype, message):
    w = GGUFWriter(tmp_path / "m.gguf")
    with pytest.raises(GGUFError, match=message):
        w.add(key, value, vtype, etype)


def test_bad_tensors_are_refused(tmp_path):
    w = GGUFWriter(tmp_path / "m.gguf")
    w.add("k", 1, V.UINT32)
    with pytest.raises(GGUFError, match="duplicate metadata key 'k'"):
        w.add("k", 2, V.UINT32)
    w.add_tensor("x" * 63, (1,), GGMLType.F32, np.zeros(1, np.float32))
    with pytest.raises(GGUFError, match="longer than 63 bytes"):
        w.add_tensor("x" * 64, (1,), GGMLType.F32, np.zeros(1, np.float32))
    with pytest.raises(GGUFError, match="duplicate tensor name"):
        w.add_tensor("x" * 63, (1,), GGMLType.F32, np.zeros(1, np.float32))
    with pytest.raises(GGUFError, match="not a multiple of q4_0's block size 32"):
        w.add_tensor("q", (2, 48), GGMLType.Q4_0, np.zeros((2, 27), np.uint8))
    with pytest.raises(GGUFError, match="needs 72 bytes, data has 36"):
        w.add_tensor("q", (4, 32), GGMLType.Q4_0, np.zeros((2, 18), np.uint8))
    with pytest.raises(GGUFError, match="f32 data must be uint8 raw bytes or float32, got float64"):
        w.add_tensor("f", (3,), GGMLType.F32, np.zeros(3))
    with pytest.raises(GGUFError, match="5 dimensions"):
        w.add_tensor("d", (1, 1, 1, 1, 1), GGMLType.F32, np.zeros(1, np.float32))
    with pytest.raises(GGUFError, match="positive integers"):
        w.add_tensor("z", (0, 4), GGMLType.F32, np.zeros(0, np.float32))
    with pytest.raises(GGUFError, match="unknown ggml type"):
        w.add_tensor("u", (4,), 99, np.zeros(4, np.uint8))
    with pytest.raises(GGUFError, match="alignment"):
        GGUFWriter(tmp_path / "m.gguf", alignment=48)


def test_target_appearing_during_write_is_not_clobbered(tmp_path):
    target = tmp_path / "m.gguf"

    def meanwhile():  # another process creates the target while we stream the data
        target.write_bytes(b"theirs")
        return np.zeros(4, np.float32)

    w = GGUFWriter(target)
    w.add_tensor("a", (4,), GGMLType.F32, meanwhile)
    with pytest.raises(LlmrunError, match="already exists"):
        w.write()
    assert target.read_bytes() == b"theirs"
    assert _leftovers(tmp_path, {"m.gguf"}) == []
