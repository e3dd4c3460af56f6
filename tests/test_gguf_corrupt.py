"""Corrupted, truncated and hostile GGUF files: every one must end in a single GGUFError naming the
file (and `llmrun info` must print one line and exit 1), never another exception or a huge allocation.

Files are composed byte by byte here (independently of our writer) so each field can be broken alone.
"""
from __future__ import annotations

import re
import struct

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from llmrun.cli import main
from llmrun.errors import GGUFError
from llmrun.gguf import GGUFReader

# --- a tiny GGUF composer ----------------------------------------------------------------------


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, s):
    return kv(key, 8, gstr(s))


def kv_arr(key, etype, items: list[bytes], count=None):
    return kv(key, 9, struct.pack("<IQ", etype, len(items) if count is None else count) + b"".join(items))


def info(name, ne, ggml_type, offset, n_dims=None):
    return (gstr(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<IQ", ggml_type, offset))


DEFAULT_KVS = [
    kv_str("general.architecture", "llama"),
    kv_u32("llama.block_count", 2),
    kv_arr("tokenizer.ggml.tokens", 8, [gstr("a"), gstr("bb")]),
    kv_arr("x.scores", 6, [struct.pack("<f", 0.5), struct.pack("<f", -1.0)]),
    kv("x.flag", 7, b"\x01"),
]
DEFAULT_INFOS = [info("a.weight", [8], 0, 0), info("b.weight", [32, 2], 8, 32)]  # f32 [8], q8_0 [2, 32]
DATA = np.arange(8, dtype=np.float32).tobytes() + bytes(range(68)) + bytes(28)  # a at 0, b at 32 (+pad)


def compose(kvs=None, infos=None, data=DATA, *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
            align=32) -> bytes:
    kvs = DEFAULT_KVS if kvs is None else kvs
    infos = DEFAULT_INFOS if infos is None else infos
    head = (magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    return head + bytes(-len(head) % align) + data


def write(tmp_path, raw: bytes, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def assert_gguf_error(path, match=None):
    with pytest.raises(GGUFError) as e:
        GGUFReader(path)
    msg = str(e.value)
    assert msg.startswith(str(path) + ": ") and "\n" not in msg
    if match:
        assert re.search(match, msg), msg


def test_composer_makes_valid_files(tmp_path):
    p = write(tmp_path, compose(), "ok.gguf")
    ref = gguf.GGUFReader(p)  # the independent reader agrees the composed file is valid
    assert [t.name for t in ref.tensors] == ["a.weight", "b.weight"]
    with GGUFReader(p) as r:
        assert r.metadata["tokenizer.ggml.tokens"] == ["a", "bb"] and r.metadata["x.flag"] is True
        assert r.tensors["b.weight"].shape == (2, 32)
        assert r.tensors["a.weight"].data.tobytes() == np.arange(8, dtype=np.float32).tobytes()


A = 2 ** 60
CASES = {
    "empty": (b"", "only 0 bytes"),
    "short": (b"GGUF\x03\x00", "only 6 bytes"),
    "magic": (compose(magic=b"GGML"), "not a GGUF file"),
    "version0": (compose(version=0), "unsupported GGUF version 0"),
    "version1": (compose(version=1), "unsupported GGUF version 1"),
    "version4": (compose(version=4), "unsupported GGUF version 4"),
    "big_endian": (compose(version=3 << 24), "big-endian"),
    "kv_count_huge": (compose(n_kv=A), f"metadata count {A} cannot fit"),
    "tensor_count_huge": (compose(n_tensors=A), f"tensor count {A} cannot fit"),
    "kv_count_plus_one": (compose(n_kv=len(DEFAULT_KVS) + 1), None),
    "tensor_count_plus_one": (compose(n_tensors=3), None),
    "key_length_huge": (compose([gstr("k", 2 ** 62) + b"\x04\x00\x00\x00"] + DEFAULT_KVS), "truncated"),
    "string_value_huge": (compose([kv("k", 8, gstr("v", 2 ** 63))]), "truncated"),
    "value_type_bad": (compose([kv("k", 13, b"\0" * 8)]), "key 'k' has unknown value type code 13"),
    "value_type_huge": (compose([kv("k", 2 ** 31, b"\0" * 8)]), "unknown value type code"),
    "array_elem_type_bad": (compose([kv_arr("k", 77, [b"\0"])]), "unknown value type code 77"),
    "nested_array": (compose([kv_arr("k", 9, [b"\0" * 12])]), "nested array"),
    "array_count_huge": (compose([kv_arr("k", 4, [b"\0" * 4], count=A)]), "claims .* elements"),
    "string_array_count_huge": (compose([kv_arr("k", 8, [gstr("a")], count=A)]), "claims .* strings"),
    "string_in_array_huge": (compose([kv_arr("k", 8, [gstr("a"), gstr("b", 2 ** 40)])]), r"truncated.*k'\[1\]"),
    "duplicate_key": (compose([kv_u32("k", 1), kv_u32("k", 2)]), "duplicate metadata key 'k'"),
    "empty_key": (compose([kv_u32("", 1)]), "empty key"),
    "bool_2": (compose([kv("k", 7, b"\x02")]), "bool"),
    "alignment_not_pow2": (compose([kv_u32("general.alignment", 48)], align=48), "not a power of two"),
    "alignment_zero": (compose([kv_u32("general.alignment", 0)]), "not a power of two"),
    "alignment_u64": (compose([kv("general.alignment", 10, struct.pack("<Q", 32))]), "must be uint32"),
    "ggml_type_unknown": (compose(infos=[info("a.weight", [8], 99, 0)]), "'a.weight' has unknown ggml type code 99"),
    "ggml_type_removed": (compose(infos=[info("a.weight", [32], 4, 0)]), "unknown ggml type code 4"),
    "n_dims_5": (compose(infos=[info("a.weight", [8, 1, 1, 1, 1], 0, 0)]), "has 5 dimensions"),
    "n_dims_0": (compose(infos=[info("a.weight", [], 0, 0)]), "has 0 dimensions"),
    "n_dims_huge": (compose(infos=[info("a.weight", [8], 0, 0, n_dims=2 ** 31)]), "dimensions"),
    "dim_zero": (compose(infos=[info("a.weight", [8, 0], 0, 0)]), "zero dimension"),
    "dims_overflow": (compose(infos=[info("a.weight", [2 ** 32, 2 ** 32, 2 ** 32], 0, 0)]), "too large"),
    "row_not_block_multiple": (compose(infos=[info("b.weight", [33, 2], 8, 0)]), "row length 33 is not a multiple"),
    "offset_past_end": (compose(infos=[info("a.weight", [8], 0, 2 ** 40)]), "extends past the end"),
    "offset_huge": (compose(infos=[info("a.weight", [8], 0, 2 ** 64 - 32)]), "extends past the end"),
    "offset_misaligned": (compose(infos=[info("a.weight", [8], 0, 4)]), "not a multiple of the alignment"),
    "overlap": (compose(infos=[info("a.weight", [8], 0, 0), info("b.weight", [32, 2], 8, 0)]), "overlap"),
    "duplicate_tensor": (compose(infos=[info("a", [8], 0, 0), info("a", [8], 0, 32)]), "duplicate tensor name 'a'"),
    "name_64_bytes": (compose(infos=[info("n" * 64, [8], 0, 0)]), "longer than 63 bytes"),
    "name_length_huge": (compose(infos=[gstr("a", 2 ** 50)]), "truncated"),
    "data_missing": (compose(data=DATA[:99]), "'b.weight' data .* extends past the end"),
    "header_only": (compose(data=b""), "extends past the end"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_file_raises_gguf_error(tmp_path, case):
    raw, match = CASES[case]
    assert_gguf_error(write(tmp_path, raw), match)


def test_every_truncation_of_a_small_file(tmp_path):
    raw = compose()
    end_of_data = len(raw) - 28  # the last tensor's padding may legally be cut
    p = tmp_path / "t.gguf"
    for n in range(end_of_data):
        p.write_bytes(raw[:n])
        assert_gguf_error(p)
    p.write_bytes(raw[:end_of_data])
    GGUFReader(p).close()


@pytest.fixture(scope="module")
def default_header(default_model):
    """The default model's metadata + tensor-info region (~1.8 MB), without tensor data."""
    with GGUFReader(default_model) as r:
        n = r.data_offset
    with open(default_model, "rb") as f:
        return f.read(n)


def test_default_model_header_truncated(tmp_path, default_header):
    p = tmp_path / "h.gguf"
    cuts = sorted(set(np.linspace(0, len(default_header), 24, dtype=int).tolist()
                      + [4, 8, 16, 23, 24, 25, 31, 40, len(default_header) - 1]))
    for n in cuts:
        p.write_bytes(default_header[:n])
        assert_gguf_error(p)  # the full header alone fails too: tensor data is past the end


def test_default_model_header_with_fake_counts(tmp_path, default_header):
    for field_offset, value, match in [(8, 2 ** 60, "tensor count"), (16, 2 ** 60, "metadata count"),
                                       (8, 2 ** 32, "tensor count"), (16, 10 ** 6, "metadata count")]:
        raw = bytearray(default_header)
        raw[field_offset:field_offset + 8] = struct.pack("<Q", value)
        assert_gguf_error(write(tmp_path, bytes(raw)), match)


def test_random_bytes(tmp_path):
    rng = np.random.default_rng(1234)
    p = tmp_path / "r.gguf"
    for i in range(300):
        body = rng.integers(0, 256, size=int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
        prefix = [b"", b"GGUF", b"GGUF\x03\x00\x00\x00"][i % 3]
        p.write_bytes(prefix + body)
        assert_gguf_error(p)


def test_random_mutations_never_escape_as_other_errors(tmp_path):
    # Flipping bytes can produce a still-valid file; what must never happen is a non-GGUFError.
    rng = np.random.default_rng(99)
    raw = compose()
    header_len = len(raw) - len(DATA)
    p = tmp_path / "m.gguf"
    n_errors = 0
    for _ in range(400):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(0, header_len))] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            GGUFReader(p).close()
        except GGUFError as e:
            assert str(e).startswith(str(p)) and "\n" not in str(e)
            n_errors += 1
    assert n_errors > 200


def test_not_a_file(tmp_path):
    assert_gguf_error(tmp_path / "missing.gguf", "cannot open")
    with pytest.raises(GGUFError, match="directory"):
        GGUFReader(tmp_path)


def _assert_cli_one_line(p):
    for args in ([str(p)], [str(p), "--json"]):
        result = CliRunner().invoke(main, ["info", *args])
        assert result.exit_code == 1
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {p}: "), result.stderr
        assert "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_info_prints_one_line(tmp_path, case):
    _assert_cli_one_line(write(tmp_path, CASES[case][0]))


def test_cli_info_on_missing_file_and_folder(tmp_path):
    _assert_cli_one_line(tmp_path / "missing.gguf")
    _assert_cli_one_line(tmp_path)
