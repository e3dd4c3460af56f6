"""Safetensors checkpoints (single file or sharded + index), read through memory maps one tensor at a time.

We parse the safetensors header ourselves (8-byte little-endian length, JSON, raw data) so that every
problem -- a truncated shard, a tensor whose bytes run past the end, an index naming a missing file --
becomes one ConvertError naming the file, and so that the pages of a tensor can be dropped from the
process as soon as it has been converted (madvise), keeping peak memory near one tensor.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmrun.errors import ConvertError
from llmrun.gguf.metadata import is_integer

from .safepaths import child, inside

# safetensors dtype -> numpy dtype of the stored elements (bf16 kept as raw uint16 bits)
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "U8": np.dtype("u1"), "I8": np.dtype("i1")}
FLOAT_DTYPES = ("F32", "F16", "BF16")
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the top half of an f32)."""
    out = bits.astype(np.uint32)
    out <<= 16   # in place: no second full-size temporary
    return out.view(np.float32)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str          # "F32", "F16", "BF16" (or "U8", "I8": parts of bitsandbytes weights)
    shape: tuple[int, ...]
    file: Path
    start: int          # absolute byte offset in file
    nbytes: int


def _entry(path: Path, name: str, info, data_start: int, size: int, dtypes: tuple[str, ...]) -> TensorEntry:
    """One header entry, every field checked for its type and range (the JSON may hold anything)."""
    if not isinstance(info, dict):
        raise ConvertError(f"{path}: corrupt safetensors header entry for {name!r:.80}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise ConvertError(f"{path}: tensor {name!r:.80} has no dtype string in the header")
    if dtype not in dtypes:
        raise ConvertError(f"{path}: tensor {name} has dtype {dtype!r:.20}; only F32, F16 and BF16 "
                           "checkpoints are supported")
    if not isinstance(shape, list) or len(shape) > 8 or not all(is_integer(d) and d >= 0 for d in shape):
        raise ConvertError(f"{path}: tensor {name!r:.80} has an invalid shape in the header")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_integer(o) for o in offsets):
        raise ConvertError(f"{path}: tensor {name!r:.80} has invalid data_offsets in the header")
    a, b = offsets
    count = 1
    for d in shape:
        count *= d
    if not 0 <= a <= b or b - a != count * _DTYPES[dtype].itemsize:
        raise ConvertError(f"{path}: tensor {name} has inconsistent shape/offsets in the header")
    if data_start + b > size:
        raise ConvertError(f"{path}: truncated safetensors file (tensor {name} needs bytes up to "
                           f"{data_start + b}, file has {size})")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + a, b - a)


class SafetensorsFile:
    """One .safetensors file: its header parsed and validated, its data memory-mapped on demand.
    `folder`: the checkpoint or adapter folder the file must lie in (safepaths.py)."""

    def __init__(self, path: Path, dtypes: tuple[str, ...] = FLOAT_DTYPES, folder: Path | None = None):
        self.path = Path(path)
        inside(self.path, folder if folder is not None else self.path.parent)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConvertError(f"{self.path}: truncated safetensors file (no header)")
                n = int.from_bytes(head, "little")
                if n > _MAX_HEADER or 8 + n > size:
                    raise ConvertError(f"{self.path}: truncated or corrupt safetensors file "
                                       f"(header of {n} bytes, file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except RecursionError:
            raise ConvertError(f"{self.path}: corrupt safetensors header (nested too deeply)") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise ConvertError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            self.entries[name] = _entry(self.path, name, info, self.data_start, size, dtypes)
        # Two tensors sharing bytes means a corrupt or crafted offset table (safetensors forbids it).
        spans = sorted((e.start, e.start + e.nbytes, e.name) for e in self.entries.values() if e.nbytes)
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise ConvertError(f"{self.path}: tensors {n0} and {n1} overlap in the data section")
        self._map: mmap.mmap | None = None

    def _mmap(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def view(self, e: TensorEntry) -> np.ndarray:
        """Zero-copy view of the stored elements (bf16 as uint16), in the checkpoint's shape."""
        buf = self._mmap()
        arr = np.frombuffer(buf, dtype=_DTYPES[e.dtype], count=e.nbytes // _DTYPES[e.dtype].itemsize,
                            offset=e.start)
        return arr.reshape(e.shape)

    def release(self, e: TensorEntry) -> None:
        """Drop the tensor's pages from our resident set (they stay in the page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            page = mmap.PAGESIZE
            lo = e.start // page * page
            try:
                self._map.madvise(mmap.MADV_DONTNEED, lo, e.start + e.nbytes - lo)
            except (OSError, ValueError):
                pass  # advisory only

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still alive; the map goes away with it
            self._map = None


class Checkpoint:
    """All tensors of a HF folder: `model.safetensors`, or the shards listed by `model.safetensors.index.json`."""

    def __init__(self, hf_dir: Path, prefix: str = "model", quantization: dict | None = None):
        """quantization: config.json's quantization_config (bitsandbytes checkpoints, see bnb.py)."""
        from . import bnb
        self.dir = Path(hf_dir)
        quantized = bnb.is_bitsandbytes(quantization, self.dir / "config.json")
        index = self.dir / f"{prefix}.safetensors.index.json"
        single = self.dir / f"{prefix}.safetensors"
        if index.is_file():
            from .jsonfile import read_json_object
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConvertError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                                   "shard file names)")
            shard_names = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, shard_names = None, [single.name]
        else:
            shards = sorted(p.name for p in self.dir.glob(f"{prefix}-*.safetensors"))
            if not shards:
                if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pth")):
                    raise ConvertError(f"{self.dir}: only PyTorch .bin/.pth weights found; "
                                       "llmrun converts safetensors checkpoints")
                raise ConvertError(f"{self.dir}: no {prefix}.safetensors (or sharded "
                                   f"{prefix}-0000x-of-0000y.safetensors) found")
            weight_map, shard_names = None, shards
        self.files: list[SafetensorsFile] = []
        self.entries: dict[str, TensorEntry] = {}
        by_path: dict[Path, SafetensorsFile] = {}
        for shard in shard_names:
            p = child(self.dir, shard, "shard") if weight_map is not None else self.dir / shard
            if not p.is_file():
                raise ConvertError(f"{p}: shard listed in the index is missing")
            st = SafetensorsFile(p, tuple(_DTYPES) if quantized else FLOAT_DTYPES, folder=self.dir)
            self.files.append(st)
            by_path[st.path] = st
            for name, e in st.entries.items():
                if name in self.entries:
                    raise ConvertError(f"{p}: tensor {name} also appears in {self.entries[name].file.name}")
                self.entries[name] = e
        if weight_map is not None:
            missing = sorted(n for n in weight_map if n not in self.entries)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ConvertError(f"{index}: tensor {missing[0]}{more} not found in its shard "
                                   f"{weight_map[missing[0]]}")
        self._by_path = by_path
        # the quantized weights' parts leave self.entries; each weight keeps one entry (its packed data)
        self.bnb = bnb.BnbWeights.take(self.entries, self._read, self.dir) if quantized else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.bnb is not None and name in self.bnb:
            return self.bnb.shape(name)
        return self.entries[name].shape

    def _read(self, e: TensorEntry) -> np.ndarray:
        """A copy of any entry's stored values; its mapped pages are released right after."""
        st = self._by_path[e.file]
        v = st.view(e)
        out = v.copy()
        del v
        st.release(e)
        return out

    def load_f32(self, name: str) -> np.ndarray:
        """A fresh float32 copy of one tensor; its mapped pages are released right after."""
        if self.bnb is not None and name in self.bnb:
            return self.bnb.dequantize(name, self._read)
        e = self.entries[name]
        st = self._by_path[e.file]
        v = st.view(e)
        if e.dtype == "BF16":
            out = bf16_bits_to_f32(v)
        else:
            out = v.astype(np.float32, copy=True)
        del v
        st.release(e)
        return out

    def load_stored(self, name: str) -> np.ndarray:
        """A copy of one tensor in its stored type (float32, float16, or bf16 bits as uint16)."""
        return self._read(self.entries[name])

    def stored_type(self, name: str) -> str:
        if self.bnb is not None and name in self.bnb:
            return self.bnb.kind(name)
        return self.entries[name].dtype

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
