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


class SafetensorsFile:
    """One .safetensors file: its header parsed and validated, its data memory-mapped on demand."""

    def __init__(self, path: Path, dtypes: tuple[str, ...] = FLOAT_DTYPES):
        self.path = Path(path)
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
        except (UnicodeDecodeError, ValueError) as e:
            raise ConvertError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            try:
                dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{self.path}: corrupt safetensors header entry for {name!r}") from None
            if dtype not in dtypes:
                raise ConvertError(f"{self.path}: tensor {name} has dtype {dtype}; only F32, F16 and BF16 "
                                   "checkpoints are supported")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if any(s < 0 for s in shape) or b - a != count * _DTYPES[dtype].itemsize or a < 0:
                raise ConvertError(f"{self.path}: tensor {name} has inconsistent shape/offsets in the header")
            if self.data_start + b > size:
                raise ConvertError(f"{self.path}: truncated safetensors file (tensor {name} needs bytes up to "
                                   f"{self.data_start + b}, file has {size})")
            self.entries[name] = TensorEntry(name, dtype, shape, self.path, self.data_start + a, b - a)
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
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise ConvertError(f"{index}: not a valid safetensors index (no weight_map)") from None
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
            p = self.dir / shard
            if not p.is_file():
                raise ConvertError(f"{p}: shard listed in the index is missing")
            st = SafetensorsFile(p, tuple(_DTYPES) if quantized else FLOAT_DTYPES)
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
