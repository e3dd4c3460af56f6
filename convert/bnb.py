"""bitsandbytes-quantized checkpoints (transformers' `load_in_4bit` / `load_in_8bit` + save_pretrained;
docs/formats.md §9).

QLoRA trains adapters against a 4-bit base, so the converter dequantizes that base exactly as bitsandbytes
does and merges the adapters onto it. Stored forms (per quantized linear layer, `W` = `<module>.weight`):

- 4-bit NF4/FP4: `W` packed nibbles (two per byte, high nibble first; any storage dtype, read as bytes),
  `W.absmax` (one scale per `blocksize` consecutive values of the flattened weight), `W.quant_map` (the
  16-value code), `W.quant_state.bitsandbytes__nf4|fp4` (JSON bytes: quant_type, blocksize, dtype, shape).
  Double quantization stores absmax as uint8 codes into `W.nested_quant_map` with one float32
  `W.nested_absmax` per `nested_blocksize` codes, plus `nested_offset` in the JSON.
  value[i] = code[nibble i] * absmax[i // blocksize], in float32, rounded to the state's dtype (as
  bitsandbytes' dequantize_4bit and PEFT's merge onto 4-bit layers round it);
  nested absmax[j] = nested_code[absmax_code j] * nested_absmax[j // nested_blocksize] + nested_offset.
- 8-bit LLM.int8: `W` int8 (out, in), `<module>.SCB` float32 row scales, optional `<module>.weight_format`
  (0 = row-major); value = (int8 * SCB[row]) * float32(1/127 as bitsandbytes spells it).

Blocks run over the flattened tensor, as bitsandbytes' quantizer and its CUDA and default dequantizers lay
them out (bitsandbytes 0.50's CPU C kernel instead restarts blocks at every row; it disagrees with its own
quantizer when a row is not a whole number of blocks, so it is not the reference).
Every inconsistency is a one-line ConvertError, checked when the checkpoint is opened.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from llmrun.errors import ConvertError

from .checkpoint import TensorEntry

# bitsandbytes' get_4bit_type tables, as float32 (FP4 is listed in bit-pattern order and divided by 12)
NF4_CODE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
FP4_CODE = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                     -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], np.float32) / np.float32(12.0)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT8_SCALE = np.float32(7.874015718698502e-3)   # bitsandbytes' int8_vectorwise_dequant factor

_QS = ".quant_state.bitsandbytes__"
_SUFFIXES_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_FLOATS = ("F32", "F16", "BF16")
_CHUNK = 1 << 20   # values dequantized per step (bounds the temporaries)


def is_bitsandbytes(quantization: dict | None, config_path: Path) -> bool:
    """True for a bitsandbytes quantization_config; other quantization methods are refused."""
    if quantization is None:
        return False
    if not isinstance(quantization, dict):
        raise ConvertError(f"{config_path}: quantization_config must be an object")
    method = quantization.get("quant_method")
    if method != "bitsandbytes":
        raise ConvertError(f"{config_path}: quantization method {method!r} is not supported "
                           "(only bitsandbytes 4-bit and 8-bit checkpoints)")
    return True


@dataclass
class _Packed4:
    weight: TensorEntry
    absmax: TensorEntry
    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, int]
    nested_absmax: TensorEntry | None = None
    nested_code: TensorEntry | None = None
    nested_blocksize: int = 0
    nested_offset: float = 0.0


@dataclass
class _Int8:
    weight: TensorEntry
    scb: TensorEntry
    shape: tuple[int, int]


Reader = Callable[[TensorEntry], np.ndarray]   # a fresh copy of an entry's stored values


class BnbWeights:
    """The quantized weights of a checkpoint. `take` removes their parts from the checkpoint's entries and
    leaves one entry per quantized weight (its packed data), whose logical shape is `shape(name)`."""

    def __init__(self, where: Path):
        self.where = where
        self.packed4: dict[str, _Packed4] = {}
        self.int8: dict[str, _Int8] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.packed4 or name in self.int8

    def shape(self, name: str) -> tuple[int, int]:
        return (self.packed4.get(name) or self.int8[name]).shape

    def kind(self, name: str) -> str:
        return f"bnb_{self.packed4[name].quant_type}" if name in self.packed4 else "bnb_int8"

    # -- indexing and validation ---------------------------------------------------------------------------
    @classmethod
    def take(cls, entries: dict[str, TensorEntry], read: Reader, where: Path) -> "BnbWeights":
        self = cls(where)
        for key in [k for k in entries if _QS in k]:
            w, _, qtype = key.partition(_QS)
            self._index_4bit(entries, w, qtype, read)
        for key in [k for k in entries if k.endswith(".SCB")]:
            self._index_int8(entries, key[: -len(".SCB")], read)
        for key, e in entries.items():
            for suffix in _SUFFIXES_4BIT:
                if key.endswith(suffix) and key[: -len(suffix)] not in self.packed4:
                    raise ConvertError(f"{e.file}: {key} has no {key[: -len(suffix)]}{_QS}nf4|fp4 "
                                       "(incomplete bitsandbytes 4-bit weight)")
            if key.endswith(".weight_format"):
                raise ConvertError(f"{e.file}: {key} has no {key[: -len('.weight_format')]}.SCB "
                                   "(incomplete bitsandbytes 8-bit weight)")
            if e.dtype not in _FLOATS and key not in self:
                raise ConvertError(f"{e.file}: tensor {key} has dtype {e.dtype} but is not part of a "
                                   "bitsandbytes-quantized weight")
        return self

    def _fail(self, e: TensorEntry, what: str) -> ConvertError:
        return ConvertError(f"{e.file}: bitsandbytes weight {e.name}: {what}")

    def _part(self, entries, w_entry, name, dtypes, count=None) -> TensorEntry:
        e = entries.pop(name, None)
        if e is None:
            raise self._fail(w_entry, f"missing {name}")
        if e.dtype not in dtypes:
            raise self._fail(w_entry, f"{name} has dtype {e.dtype} (expected {'/'.join(dtypes)})")
        n = int(np.prod(e.shape, dtype=np.int64)) if e.shape else 1
        if count is not None and n != count:
            raise self._fail(w_entry, f"{name} has {n} values, expected {count}")
        return e

    def _index_4bit(self, entries, w: str, qtype: str, read: Reader) -> None:
        qs_entry = entries.pop(w + _QS + qtype)
        w_entry = entries.get(w)
        if w_entry is None:
            raise ConvertError(f"{qs_entry.file}: {qs_entry.name} has no packed weight {w}")
        if w in self.packed4:
            raise self._fail(w_entry, "has more than one quant_state")
        if qtype not in CODES:
            raise self._fail(w_entry, f"quantization type {qtype!r} is not supported (nf4, fp4)")
        if qs_entry.dtype != "U8" or qs_entry.nbytes > 1 << 16:
            raise self._fail(w_entry, "quant_state is not a small uint8 tensor")
        try:
            state = json.loads(bytes(read(qs_entry)).decode("utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as e:
            raise self._fail(w_entry, f"quant_state is not valid JSON ({e})") from None
        if state.get("quant_type") != qtype:
            raise self._fail(w_entry, f"quant_state says quant_type {state.get('quant_type')!r} "
                                      f"but is stored as bitsandbytes__{qtype}")
        bs = state.get("blocksize")
        if isinstance(bs, bool) or bs not in BLOCKSIZES:
            raise self._fail(w_entry, f"blocksize {bs!r} is not one of {', '.join(map(str, BLOCKSIZES))}")
        dtype = state.get("dtype")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise self._fail(w_entry, f"dtype {dtype!r} is not float32, float16 or bfloat16")
        shape = state.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
            raise self._fail(w_entry, f"shape {shape!r} is not two positive integers")
        n = shape[0] * shape[1]
        if w_entry.dtype not in ("U8", "I8") + _FLOATS or w_entry.nbytes != (n + 1) // 2:
            raise self._fail(w_entry, f"packed data has {w_entry.nbytes} bytes ({w_entry.dtype}); "
                                      f"shape {shape} needs {(n + 1) // 2}")
        n_blocks = -(-n // bs)
        code = self._part(entries, w_entry, w + ".quant_map", ("F32",), 16)
        if not np.array_equal(read(code), CODES[qtype]):
            raise self._fail(w_entry, f"quant_map is not bitsandbytes' {qtype} table")
        p = _Packed4(w_entry, None, qtype, bs, dtype, (shape[0], shape[1]))
        nested = "nested_offset" in state or w + ".nested_absmax" in entries
        if nested:
            p.absmax = self._part(entries, w_entry, w + ".absmax", ("U8",), n_blocks)
            nbs = state.get("nested_blocksize")
            if isinstance(nbs, bool) or not isinstance(nbs, int) or not 0 < nbs <= 1 << 20:
                raise self._fail(w_entry, f"nested_blocksize {nbs!r} is not a positive integer")
            off = state.get("nested_offset")
            if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
                raise self._fail(w_entry, f"nested_offset {off!r} is not a finite number")
            if state.get("nested_dtype", "float32") != "float32":
                raise self._fail(w_entry, f"nested_dtype {state.get('nested_dtype')!r} is not float32")
            p.nested_absmax = self._part(entries, w_entry, w + ".nested_absmax", ("F32",), -(-n_blocks // nbs))
            p.nested_code = self._part(entries, w_entry, w + ".nested_quant_map", ("F32",), 256)
            p.nested_blocksize, p.nested_offset = nbs, float(off)
        else:
            p.absmax = self._part(entries, w_entry, w + ".absmax", _FLOATS, n_blocks)
        self.packed4[w] = p

    def _index_int8(self, entries, module: str, read: Reader) -> None:
        scb = entries.pop(module + ".SCB")
        w = module + ".weight"
        w_entry = entries.get(w)
        if w_entry is None:
            raise ConvertError(f"{scb.file}: {scb.name} has no int8 weight {w}")
        if w in self.packed4:
            raise self._fail(w_entry, "is both 4-bit and 8-bit")
        if w_entry.dtype != "I8" or len(w_entry.shape) != 2 or 0 in w_entry.shape:
            raise self._fail(w_entry, f"8-bit weight must be a 2-D int8 tensor, got {w_entry.dtype} "
                                      f"{list(w_entry.shape)}")
        self._part({scb.name: scb}, w_entry, scb.name, ("F32",), w_entry.shape[0])
        fmt = entries.pop(module + ".weight_format", None)
        if fmt is not None:   # bitsandbytes' LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: 0 = row-major
            if fmt.dtype != "U8" or fmt.nbytes != 1:
                raise self._fail(w_entry, "weight_format is not a uint8 scalar")
            if int(read(fmt).reshape(-1)[0]) != 0:
                raise self._fail(w_entry, "weight_format is not 0 (row-major); re-save it with a current "
                                          "bitsandbytes")
        self.int8[w] = _Int8(w_entry, scb, tuple(w_entry.shape))

    # -- dequantization ------------------------------------------------------------------------------------
    def dequantize(self, name: str, read: Reader) -> np.ndarray:
        """The float32 weight bitsandbytes' dequantization gives (float32 holding the state's dtype)."""
        if name in self.int8:
            return self._dequantize_int8(name, read)
        p = self.packed4[name]
        n = p.shape[0] * p.shape[1]
        packed = read(p.weight).reshape(-1).view(np.uint8)
        absmax = read(p.absmax)
        if p.nested_absmax is not None:
            scales = read(p.nested_absmax)
            code2 = read(p.nested_code)
            absmax = code2[absmax.reshape(-1)] * np.repeat(scales.reshape(-1), p.nested_blocksize)[:absmax.size]
            absmax += np.float32(p.nested_offset)
        else:
            absmax = _as_f32(absmax, p.absmax.dtype).reshape(-1)
        code = CODES[p.quant_type]
        out = np.empty(n, np.float32)
        step = max(p.blocksize, _CHUNK // p.blocksize * p.blocksize)   # whole blocks, an even count
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            chunk = packed[lo // 2: (hi + 1) // 2]
            nib = np.empty(chunk.size * 2, np.uint8)
            nib[0::2] = chunk >> 4
            nib[1::2] = chunk & 0xF
            scales = np.repeat(absmax[lo // p.blocksize: -(-hi // p.blocksize)], p.blocksize)[: hi - lo]
            np.multiply(code[nib[: hi - lo]], scales, out=out[lo:hi])
        out = out.reshape(p.shape)
        return _round_to(out, p.dtype)

    def _dequantize_int8(self, name: str, read: Reader) -> np.ndarray:
        q = self.int8[name]
        w = read(q.weight)
        scb = read(q.scb).reshape(-1, 1)
        out = np.empty(q.shape, np.float32)
        rows = max(1, _CHUNK // q.shape[1])
        for r in range(0, q.shape[0], rows):
            np.multiply(w[r:r + rows].astype(np.float32) * scb[r:r + rows], INT8_SCALE, out=out[r:r + rows])
        return out


def _as_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _round_to(w: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32 weight to float16/bfloat16 (nearest-even, as torch's .to()), kept as float32."""
    if dtype == "float16":
        return w.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        from llmrun.quants.floats import dequantize_bf16, quantize_bf16
        return dequantize_bf16(quantize_bf16(w), w.shape[1])
    return w
