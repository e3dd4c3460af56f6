"""GGUF writer: explicit value types, streamed tensor data, atomic replace of the target file.

Layout (docs/formats.md §1): header, KVs, tensor infos, zero padding to the alignment, then each
tensor's bytes followed by zero padding (after the last one too), in info order.
"""
from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..errors import GGUFError, LlmrunError
from ..ggml import GGML_BLOCK, GGMLType
from .constants import (GGML_MAX_DIMS, GGML_MAX_NAME, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION,
                        VALUE_DTYPES, GGUFValueType)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-2**7, 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-2**15, 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-2**31, 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-2**63, 2**63 - 1),
}
_FLOAT_TYPES = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
# numpy dtypes accepted as tensor data besides raw uint8 bytes
_TYPED_DATA = {GGMLType.F32: np.float32, GGMLType.F16: np.float16, GGMLType.BF16: np.uint16}


def _pad(n: int, align: int) -> int:
    return (-n) % align


def _encode_string(s, what: str) -> bytes:
    if isinstance(s, (bytes, bytearray)):
        b = bytes(s)
    elif isinstance(s, str):
        b = s.encode("utf-8", "surrogateescape")  # mirrors the reader: undecodable bytes round-trip
    else:
        raise GGUFError(f"{what}: expected a string, got {type(s).__name__}")
    return _U64.pack(len(b)) + b


def _check_scalar(value, vtype: GGUFValueType, what: str):
    """The value as the Python type to pack, or a GGUFError saying why it does not fit vtype."""
    if vtype is GGUFValueType.BOOL:
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            return bool(value)
        raise GGUFError(f"{what}: {value!r} is not a bool")
    if vtype in _FLOAT_TYPES:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            return float(value)
        raise GGUFError(f"{what}: {value!r} is not a number")
    lo, hi = _INT_RANGES[vtype]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise GGUFError(f"{what}: {value!r} is not an integer")
    if not lo <= int(value) <= hi:
        raise GGUFError(f"{what}: {value} does not fit in {vtype.name.lower()}")
    return int(value)


def _encode_array(values, etype: GGUFValueType, what: str) -> bytes:
    if etype is GGUFValueType.ARRAY:
        raise GGUFError(f"{what}: nested arrays are not allowed in GGUF")
    if isinstance(values, (str, bytes)):
        raise GGUFError(f"{what}: expected a sequence for an array, got {type(values).__name__}")
    head = _U32.pack(etype) + _U64.pack(len(values))
    if etype is GGUFValueType.STRING:
        return head + b"".join(_encode_string(v, f"{what}[{i}]") for i, v in enumerate(values))
    dt = np.dtype(VALUE_DTYPES[etype])
    arr = np.asarray(values)
    if arr.ndim != 1 and len(values):
        raise GGUFError(f"{what}: array values must be one-dimensional")
    if len(values) == 0:
        return head
    if etype is GGUFValueType.BOOL:
        if arr.dtype != np.bool_ and not np.isin(arr, (0, 1)).all():
            raise GGUFError(f"{what}: array holds values that are not bools")
        return head + arr.astype(dt).tobytes()
    if etype in _FLOAT_TYPES:
        if arr.dtype.kind not in "iuf" :
            raise GGUFError(f"{what}: array holds values that are not numbers")
        return head + arr.astype(dt).tobytes()
    if arr.dtype.kind not in "iu":
        raise GGUFError(f"{what}: array holds values that are not integers ({arr.dtype})")
    lo, hi = _INT_RANGES[etype]
    if int(arr.min()) < lo or int(arr.max()) > hi:
        raise GGUFError(f"{what}: array values do not fit in {etype.name.lower()}")
    return head + arr.astype(dt).tobytes()


def encode_value(value, vtype: GGUFValueType, elem_type: GGUFValueType | None, what: str) -> bytes:
    """Type code + payload of one KV value (without the key)."""
    try:
        vtype = GGUFValueType(vtype)
    except ValueError:
        raise GGUFError(f"{what}: unknown value type {vtype!r}") from None
    out = _U32.pack(vtype)
    if vtype is GGUFValueType.STRING:
        return out + _encode_string(value, what)
    if vtype is GGUFValueType.ARRAY:
        if elem_type is None:
            raise GGUFError(f"{what}: an array needs an explicit element type")
        try:
            elem_type = GGUFValueType(elem_type)
        except ValueError:
            raise GGUFError(f"{what}: unknown array element type {elem_type!r}") from None
        return out + _encode_array(value, elem_type, what)
    v = _check_scalar(value, vtype, what)
    return out + np.array(v, dtype=VALUE_DTYPES[vtype]).tobytes()


class _PendingTensor:
    __slots__ = ("name", "shape", "ggml_type", "nbytes", "data")

    def __init__(self, name, shape, ggml_type, nbytes, data):
        self.name, self.shape, self.ggml_type, self.nbytes, self.data = name, shape, ggml_type, nbytes, data


class GGUFWriter:
    """Collect KVs and tensors, then `write()` the file in one streaming pass (atomically)."""

    def __init__(self, path, overwrite: bool = False, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: alignment {alignment!r} is not a power of two")
        self.path = Path(path)
        self.overwrite = overwrite
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}  # key -> encoded type + value, in insertion order
        self._tensors: dict[str, _PendingTensor] = {}
        self._written = False

    def add(self, key: str, value, vtype: GGUFValueType, elem_type: GGUFValueType | None = None) -> None:
        if not isinstance(key, str) or not key:
            raise GGUFError(f"{self.path}: metadata keys must be non-empty strings, got {key!r}")
        if key in self._kv:
            raise GGUFError(f"{self.path}: duplicate metadata key {key!r}")
        if key == "general.alignment" and (vtype != GGUFValueType.UINT32 or value != self.alignment):
            raise GGUFError(f"{self.path}: general.alignment must be uint32 {self.alignment} "
                            f"(pass alignment= to GGUFWriter)")
        self._kv[key] = encode_value(value, vtype, elem_type, f"{self.path}: key {key!r}")

    def add_tensor(self, name: str, shape, ggml_type, data) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(name, str) or not name:
            raise GGUFError(f"{self.path}: tensor names must be non-empty strings, got {name!r}")
        if len(name.encode("utf-8", "surrogateescape")) >= GGML_MAX_NAME:
            raise GGUFError(f"{where}: name is longer than {GGML_MAX_NAME - 1} bytes")
        if name in self._tensors:
            raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
        try:
            ggml_type = GGMLType.from_name(ggml_type) if isinstance(ggml_type, str) else GGMLType(ggml_type)
        except ValueError:
            raise GGUFError(f"{where}: unknown ggml type {ggml_type!r}") from None
        shape = tuple(shape)
        if not 1 <= len(shape) <= GGML_MAX_DIMS:
            raise GGUFError(f"{where}: {len(shape)} dimensions (must be 1..{GGML_MAX_DIMS})")
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
            raise GGUFError(f"{where}: shape {shape} must be positive integers")
        shape = tuple(int(d) for d in shape)
        blck, tsize = GGML_BLOCK[ggml_type]
        if shape[-1] % blck:
            raise GGUFError(f"{where}: row length {shape[-1]} is not a multiple of "
                            f"{ggml_type.lower}'s block size {blck}")
        n_el = int(np.prod(shape, dtype=object))
        nbytes = n_el // blck * tsize
        t = _PendingTensor(name, shape, ggml_type, nbytes, data)
        if not callable(data):
            self._as_bytes(t, data)  # validate now, the earlier the clearer
        self._tensors[name] = t

    def _as_bytes(self, t: _PendingTensor, data) -> np.ndarray:
        """Validate one tensor's data against its shape/type; returns a C-contiguous LE array to write."""
        where = f"{self.path}: tensor {t.name!r}"
        if not isinstance(data, np.ndarray):
            raise GGUFError(f"{where}: data must be a numpy array, got {type(data).__name__}")
        if data.dtype != np.uint8:
            want = _TYPED_DATA.get(t.ggml_type)
            if want is None or data.dtype.newbyteorder("=") != np.dtype(want):
                allowed = "uint8 raw bytes" + (f" or {np.dtype(want).name}" if want else "")
                raise GGUFError(f"{where}: {t.ggml_type.lower} data must be {allowed}, got {data.dtype}")
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
        if data.nbytes != t.nbytes:
            raise GGUFError(f"{where}: {t.ggml_type.lower} of shape {t.shape} needs {t.nbytes} bytes, "
                            f"data has {data.nbytes}")
        return np.ascontiguousarray(data)

    # --- output --------------------------------------------------------------------------------
    def _header_bytes(self) -> bytes:
        kv = dict(self._kv)
        if self.alignment != GGUF_DEFAULT_ALIGNMENT and "general.alignment" not in kv:
            kv["general.alignment"] = encode_value(self.alignment, GGUFValueType.UINT32, None, "general.alignment")
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self._tensors), len(kv))]
        for key, enc in kv.items():
            parts.append(_encode_string(key, key))
            parts.append(enc)
        offset = 0
        for t in self._tensors.values():
            parts.append(_encode_string(t.name, t.name))
            parts.append(_U32.pack(len(t.shape)))
            parts.extend(_U64.pack(d) for d in reversed(t.shape))  # GGUF stores ne: innermost first
            parts.append(_U32.pack(t.ggml_type))
            parts.append(_U64.pack(offset))
            offset += t.nbytes + _pad(t.nbytes, self.alignment)
        head = b"".join(parts)
        return head + bytes(_pad(len(head), self.alignment))

    def _publish(self, tmp: str) -> None:
        """Move the finished temp file to the target in one step."""
        if self.overwrite:
            os.replace(tmp, self.path)
            return
        # link() fails if the target appeared while we were writing: no window to clobber it
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise LlmrunError(f"{self.path}: already exists (use --force / overwrite=True to replace it)") from None
        except OSError:  # a file system without hard links: check, then rename
            check_output_path(self.path, self.overwrite)
            os.replace(tmp, self.path)
            return
        os.unlink(tmp)

    def write(self) -> None:
        """Write everything to a temp file beside the target, fsync, then rename over the target."""
        if self._written:
            raise GGUFError(f"{self.path}: write() was already called")
        check_output_path(self.path, self.overwrite)
        folder = self.path.parent
        header = self._header_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                f.write(header)
                for t in self._tensors.values():
                    data = t.data() if callable(t.data) else t.data
                    arr = self._as_bytes(t, data)
                    f.write(memoryview(arr.reshape(-1)).cast("B"))
                    f.write(bytes(_pad(t.nbytes, self.alignment)))
                    t.data = None  # free the array (and anything the callable captured) early
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
            self._publish(tmp)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self._written = True
        try:  # make the rename itself durable; not fatal where directories cannot be fsynced
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def check_output_path(path, overwrite: bool = False, inputs=()) -> None:
    """The one check of a file about to be written; LlmrunError if it must not be.

    Refuses a folder, a missing parent folder, an existing file unless `overwrite`, and any of `inputs`
    (paths the same run reads; hard and symbolic links count as the same file). Tools call it before they
    start working; GGUFWriter.write calls it again just before it writes."""
    path = Path(path)
    if path.is_dir():
        raise LlmrunError(f"{path}: is a folder; give a file name")
    for source in inputs:
        if _same_file(path, Path(source)):
            raise LlmrunError(f"{path}: output is the same file as an input")
    if not overwrite and os.path.lexists(path):
        raise LlmrunError(f"{path}: already exists (use --force / overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise LlmrunError(f"{path}: folder {path.parent} does not exist")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
