"""GGUF reader: memory-maps a file, validates the whole header up front, exposes zero-copy tensor views.

Every check happens before anything is allocated from a count found in the file, so a corrupt or
hostile file costs at most its own size and always ends in one GGUFError naming the file.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import GGUFError
from ..ggml import GGML_BLOCK, GGMLType
from .constants import (GGML_MAX_DIMS, GGML_MAX_NAME, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, VALUE_DTYPES,
                        GGUFValueType)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IIQQ")  # magic, version, tensor_count, kv_count
# struct codes with standard sizes ("<"): numpy's dtype chars would be platform-sized ('L' is 4 bytes here)
_SCALAR_STRUCTS = {t: struct.Struct("<" + c) for t, c in {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}.items()}

# Smallest possible records, used to reject absurd counts before looping over them:
# KV = key length (8) + 1 key byte + value type (4) + 1 value byte;
# tensor info = name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
_MIN_KV_BYTES = 14
_MIN_TENSOR_INFO_BYTES = 32
_MAX_ELEMENTS = (1 << 63) - 1  # ggml counts elements and bytes in int64


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class TensorInfo:
    """One tensor of a GGUF file; `data` is a zero-copy view of its raw bytes
    (llmrun.tensors.tensor_to_float32 dequantizes them)."""

    __slots__ = ("name", "ggml_type", "shape", "n_elements", "nbytes", "offset", "_reader")

    def __init__(self, name: str, ggml_type: GGMLType, shape: tuple[int, ...], offset: int,
                 reader: "GGUFReader"):
        self.name = name
        self.ggml_type = ggml_type
        self.shape = shape  # numpy order: the reverse of GGUF's ne
        self.n_elements = int(np.prod(shape, dtype=object))
        self.nbytes = self.n_elements // ggml_type.block_size * ggml_type.type_size
        self.offset = offset  # absolute position in the file
        self._reader = reader

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[-1]

    @property
    def row_nbytes(self) -> int:
        return self.shape[-1] // self.ggml_type.block_size * self.ggml_type.type_size

    @property
    def data(self) -> np.ndarray:
        """uint8 view (n_rows, row_nbytes) into the memory map (read-only, no copy)."""
        mm = self._reader._mm
        if mm is None:
            raise GGUFError(f"{self._reader.path}: file is closed")
        return mm[self.offset:self.offset + self.nbytes].reshape(self.n_rows, self.row_nbytes)

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.ggml_type.lower}, shape={self.shape})"


class _Cursor:
    """Bounds-checked little-endian parsing over a memoryview; every overrun is a GGUFError."""

    __slots__ = ("buf", "pos", "size", "path")

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} at offset {self.pos} needs {n} bytes, "
                      f"only {self.size - self.pos} left in the file")

    def u32(self, what: str) -> int:
        self.need(4, what)
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        v = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        start = self.pos
        self.pos += n
        # surrogateescape: bytes that are not UTF-8 survive a read/write round trip unchanged
        return str(self.buf[start:self.pos], "utf-8", "surrogateescape")


def _value_type(code: int, cur: _Cursor, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        cur.fail(f"{what} has unknown value type code {code}")


def _read_scalar(cur: _Cursor, vtype: GGUFValueType, what: str):
    st = _SCALAR_STRUCTS[vtype]
    cur.need(st.size, what)
    v = st.unpack_from(cur.buf, cur.pos)[0]
    cur.pos += st.size
    if vtype is GGUFValueType.BOOL:
        if v > 1:
            cur.fail(f"{what} is a bool with value {v} (must be 0 or 1)")
        return bool(v)
    return v


def _read_string_array(cur: _Cursor, n: int, what: str) -> list[str]:
    # The hot loop of metadata loading (vocabularies hold ~50k-250k strings): locals only.
    buf, size, pos = cur.buf, cur.size, cur.pos
    unpack = _U64.unpack_from
    out = []
    append = out.append
    for i in range(n):
        if pos + 8 > size:
            cur.pos = pos
            cur.need(8, f"length of {what}[{i}]")
        ln = unpack(buf, pos)[0]
        pos += 8
        end = pos + ln
        if end > size:
            cur.pos = pos
            cur.need(ln, f"{what}[{i}] ({ln} bytes)")
        append(str(buf[pos:end], "utf-8", "surrogateescape"))
        pos = end
    cur.pos = pos
    return out


def _read_value(cur: _Cursor, vtype: GGUFValueType, what: str):
    """Returns (value, element type or None)."""
    if vtype is GGUFValueType.STRING:
        return cur.string(what), None
    if vtype is not GGUFValueType.ARRAY:
        return _read_scalar(cur, vtype, what), None
    etype = _value_type(cur.u32(f"element type of {what}"), cur, f"array {what}")
    n = cur.u64(f"element count of {what}")
    if etype is GGUFValueType.ARRAY:
        cur.fail(f"{what} is a nested array (not allowed in GGUF)")
    if etype is GGUFValueType.STRING:
        if n > (cur.size - cur.pos) // 8:
            cur.fail(f"{what} claims {n} strings, more than fit in the rest of the file")
        return _read_string_array(cur, n, what), etype
    dt = np.dtype(VALUE_DTYPES[etype])
    if n > (cur.size - cur.pos) // dt.itemsize:
        cur.fail(f"{what} claims {n} {etype.name.lower()} elements, more than fit in the rest of the file")
    nbytes = n * dt.itemsize
    arr = np.frombuffer(cur.buf, dtype=dt, count=n, offset=cur.pos)
    cur.pos += nbytes
    if etype is GGUFValueType.BOOL:
        if n and int(arr.max()) > 1:
            cur.fail(f"{what} holds a bool that is neither 0 nor 1")
        return arr != 0, etype
    return arr.astype(dt.newbyteorder("="), copy=True), etype  # owned copy: outlives the map


class GGUFReader:
    """Parse and validate a GGUF (v2/v3, little-endian) file; tensor bytes stay memory-mapped."""

    def __init__(self, path):
        self.path = str(path)
        self._mm = None
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror or e})") from None
        if Path(self.path).is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        if size < _HEADER.size:
            raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes)")
        try:
            # a plain ndarray view (its base keeps the mapping alive): tensor views are ordinary arrays
            mm = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: cannot map file ({e})") from None
        self.file_size = size
        self._mm = mm
        try:
            self._parse(memoryview(mm))
        except BaseException:
            self._mm = None
            raise

    # --- parsing -------------------------------------------------------------------------------
    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf, self.path)
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf, 0)
        cur.pos = _HEADER.size
        if magic != GGUF_MAGIC:
            cur.fail(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        if version & 0xFFFF == 0 and version != 0:
            cur.fail(f"GGUF version {version:#x} looks byte-swapped: big-endian files are not supported")
        if version not in (2, 3):
            cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        rest = cur.size - cur.pos
        if n_kv > rest // _MIN_KV_BYTES:
            cur.fail(f"metadata count {n_kv} cannot fit in the {rest} bytes after the header")
        if n_tensors > (rest - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES:
            cur.fail(f"tensor count {n_tensors} cannot fit in the {rest} bytes after the header")

        metadata: dict = {}
        types: dict = {}
        for i in range(n_kv):
            key = cur.string(f"key of metadata entry {i}")
            if not key:
                cur.fail(f"metadata entry {i} has an empty key")
            if key in metadata:
                cur.fail(f"duplicate metadata key {key!r}")
            vtype = _value_type(cur.u32(f"value type of {key!r}"), cur, f"key {key!r}")
            value, etype = _read_value(cur, vtype, f"key {key!r}")
            metadata[key] = value
            types[key] = (vtype, etype)
        self.metadata = metadata
        self.metadata_types = types

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if "general.alignment" in metadata:
            a = metadata["general.alignment"]
            if types["general.alignment"][0] is not GGUFValueType.UINT32:
                cur.fail(f"general.alignment must be uint32, found {types['general.alignment'][0].name.lower()}")
            if a == 0 or a & (a - 1):
                cur.fail(f"general.alignment {a} is not a power of two")
            self.alignment = a

        infos = []  # (name, type, shape, relative offset)
        names: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"name of tensor {i}")
            if name in names:
                cur.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            if len(name.encode("utf-8", "surrogateescape")) >= GGML_MAX_NAME:
                cur.fail(f"tensor name {name[:80]!r} is longer than {GGML_MAX_NAME - 1} bytes")
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                cur.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1..{GGML_MAX_DIMS})")
            ne = [cur.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
            code = cur.u32(f"type of tensor {name!r}")
            rel = cur.u64(f"offset of tensor {name!r}")
            try:
                gtype = GGMLType(code)
            except ValueError:
                cur.fail(f"tensor {name!r} has unknown ggml type code {code}")
            n_el = 1
            for d in ne:
                if d == 0:
                    cur.fail(f"tensor {name!r} has a zero dimension (ne={ne})")
                n_el *= d
                if n_el > _MAX_ELEMENTS:
                    cur.fail(f"tensor {name!r} is too large (ne={ne} overflows int64)")
            blck, tsize = GGML_BLOCK[gtype]
            if ne[0] % blck:
                cur.fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of "
                         f"{gtype.lower}'s block size {blck}")
            if n_el // blck * tsize > _MAX_ELEMENTS:
                cur.fail(f"tensor {name!r} is too large (ne={ne})")
            infos.append((name, gtype, tuple(int(d) for d in reversed(ne)), rel))

        self.data_offset = _align(cur.pos, self.alignment)
        tensors: dict[str, TensorInfo] = {}
        for name, gtype, shape, rel in infos:
            if rel % self.alignment:
                cur.fail(f"tensor {name!r} offset {rel} is not a multiple of the alignment {self.alignment}")
            ti = TensorInfo(name, gtype, shape, self.data_offset + rel, self)
            if ti.offset + ti.nbytes > self.file_size:
                cur.fail(f"tensor {name!r} data ({ti.nbytes} bytes at offset {ti.offset}) extends past "
                         f"the end of the file ({self.file_size} bytes)")
            tensors[name] = ti
        # Overlapping tensors mean a corrupt offset table (gguf.cpp even requires them packed in order).
        spans = sorted((ti.offset, ti.offset + ti.nbytes, ti.name) for ti in tensors.values())
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                cur.fail(f"tensors {n0!r} and {n1!r} overlap in the data section")
        self.tensors = tensors

    # --- access --------------------------------------------------------------------------------
    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def close(self) -> None:
        # Dropping the reference unmaps once no tensor view is alive (numpy owns the mapping).
        self._mm = None

    def __enter__(self) -> "GGUFReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFReader({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

