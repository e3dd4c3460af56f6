"""F32, F16 and BF16 storage against ggml's bytes, gguf-py, torch and IEEE bit patterns worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmrun.errors import QuantError
from llmrun.ggml import GGMLType
from llmrun.quants import dequantize, floats, quantize


def _f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("qtype", ["f16", "bf16"])
def test_matches_ggml_bytes(quant_vectors, qtype):
    np.testing.assert_array_equal(quantize(quant_vectors["x"], qtype), quant_vectors[qtype])


def test_f32_round_trip_is_exact(quant_vectors):
    x = quant_vectors["x"]
    raw = quantize(x, "f32")
    assert raw.dtype == np.uint8 and raw.shape == (24, 2048)
    np.testing.assert_array_equal(raw.view("<f4"), x)
    np.testing.assert_array_equal(dequantize(raw, "f32", x.shape), x)


def test_bf16_rounding_by_hand():
    # 1 + 2^-8 is the exact midpoint of 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
    # 1 + 3*2^-8 is the midpoint of 1 + 2^-7 (odd) and 1 + 2^-6 (even): rounds up to 0x3F82.
    # 1 + 2^-8 + 2^-20 is above the midpoint: rounds up to 0x3F81.
    x = np.array([[1.0, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20,
                   -2.0, np.inf, -np.inf, 0.0]], dtype=np.float32)
    x = np.concatenate([x, _f32([[0x7F7FFFFF, 0x00000001, 0x80008000, 0x00018000,
                                  0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x3F808000]])], axis=0)
    got = floats.QUANTIZE[GGMLType.BF16](x).view("<u2")  # the raw conversion: quantize() refuses inf/NaN
    want = np.array([[0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000, 0x7F80, 0xFF80, 0x0000],
                     # FLT_MAX rounds to +inf; subnormals are kept (not flushed); a signalling NaN
                     # is truncated and made quiet rather than rounded into the exponent
                     [0x7F80, 0x0000, 0x8000, 0x0002, 0x7FC0, 0xFFC0, 0x7FFF, 0x3F80]], dtype=np.uint16)
    np.testing.assert_array_equal(got, want)


def test_bf16_matches_gguf_py_and_torch():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((8, 512)) * np.exp(rng.uniform(-30, 30, (8, 512)))).astype(np.float32)
    got = quantize(x, "bf16")
    np.testing.assert_array_equal(got, gguf_quants.quantize(x, GGMLQuantizationType.BF16))
    torch_bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got.view("<u2"), torch_bits)


def test_f16_matches_torch_including_rounding_at_the_ends():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, 256)) * np.exp(rng.uniform(-20, 10, (4, 256)))).astype(np.float32)
    x = np.clip(x, -65504, 65504)
    x[0, :4] = [65519.0, -65519.0, 2.0**-25, 3 * 2.0**-25]  # round down to the max; subnormal ties
    torch_bits = torch.from_numpy(x).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(quantize(x, "f16").view("<u2"), torch_bits)


@pytest.mark.parametrize("value", [65520.0, -1e6])
def test_f16_overflow_is_an_error_like_llama_quantize(value):
    x = np.zeros((2, 32), dtype=np.float32)
    x[1, 3] = value
    with pytest.raises(QuantError, match="f16"):
        quantize(x, "f16")


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(qtype, value):
    x = np.ones((3, 64), dtype=np.float32)
    x[2, 40] = value
    with pytest.raises(QuantError, match="row 2, column 40"):
        quantize(x, qtype)
    np.testing.assert_array_equal(quantize(x, "f32").view("<f4"), x)  # f32 stores values as they are


@pytest.mark.parametrize("qtype", ["f16", "bf16"])
def test_dequantize_matches_gguf_py(qtype):
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 256, (6, 2 * 96), dtype=np.uint8)
    want = gguf_quants.dequantize(raw, GGMLQuantizationType[qtype.upper()])
    got = dequantize(raw, qtype, (6, 96))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, dtype=np.float32).view(np.uint32))


def test_chunking_does_not_change_results(monkeypatch):
    from llmrun.quants import floats
    monkeypatch.setattr(floats, "CHUNK_WEIGHTS", 1000)  # 7 rows of 128 per chunk: 37 rows need 6 chunks
    x = np.random.default_rng(9).standard_normal((37, 128)).astype(np.float32)
    raw = quantize(x, "bf16")
    np.testing.assert_array_equal(raw, gguf_quants.quantize(x, GGMLQuantizationType.BF16))
    np.testing.assert_array_equal(quantize(x, "f16").view("<f2"), torch.from_numpy(x).half().numpy())
    back = dequantize(raw, "bf16", x.shape)
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())
