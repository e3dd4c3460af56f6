"""Q2_K..Q6_K and IQ4_NL against ggml's own bytes (quant-vectors.npz) and gguf-py's dequantizer."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmrun.errors import QuantError
from llmrun.quants import dequantize, quantize

TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl"]
K_TYPES = TYPES[:5]
BLOCK = {"q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
         "iq4_nl": (32, 18)}
# byte offsets of the fp16 fields in each block (everything else may be random)
FP16_FIELDS = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "iq4_nl": (0,)}


def _gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES)
def test_quantize_matches_ggml_bytes(quant_vectors, qtype):
    x = quant_vectors["x"]
    got = quantize(x, qtype)
    want = quant_vectors[qtype]
    assert got.dtype == np.uint8 and got.shape == want.shape
    bad = [r for r in range(x.shape[0]) if not np.array_equal(got[r], want[r])]
    assert not bad, f"{qtype}: rows {bad} differ from ggml"


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_ggml_and_gguf_py(quant_vectors, qtype):
    raw = quant_vectors[qtype]
    got = dequantize(raw, qtype, quant_vectors["x"].shape)
    assert got.dtype == np.float32 and got.shape == quant_vectors["x"].shape
    np.testing.assert_array_equal(_bits(got), _bits(quant_vectors[f"{qtype}_dequant"]))
    np.testing.assert_array_equal(_bits(got), _bits(gguf_quants.dequantize(raw, _gguf_type(qtype))))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_blocks_like_gguf_py(qtype):
    """Arbitrary bit patterns (every scale code, sign, high bit) decode exactly like gguf-py."""
    blck, nbytes = BLOCK[qtype]
    rng = np.random.default_rng(7)
    n_rows, n_blocks = 5, 3
    raw = rng.integers(0, 256, (n_rows, n_blocks, nbytes), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:  # finite scales of either sign, normal and subnormal
        halves = (rng.standard_normal((n_rows, n_blocks)) * 10.0 ** rng.integers(-7, 3, (n_rows, n_blocks)))
        raw[:, :, off:off + 2] = halves.astype("<f2").view(np.uint8).reshape(n_rows, n_blocks, 2)
    raw = raw.reshape(n_rows, n_blocks * nbytes)
    got = dequantize(raw, qtype, (n_rows, n_blocks * blck))
    want = gguf_quants.dequantize(raw, _gguf_type(qtype))
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_are_independent_any_count(quant_vectors, qtype):
    """Odd row counts, shuffled rows and a 3-D input give ggml's bytes for each row."""
    x, want = quant_vectors["x"], quant_vectors[qtype]
    idx = [19, 3, 14, 0, 22, 7, 11]
    np.testing.assert_array_equal(quantize(x[idx], qtype), want[idx])
    np.testing.assert_array_equal(quantize(x[5:6], qtype), want[5:6])
    three_d = quantize(x[:6].reshape(2, 3, 512), qtype)
    np.testing.assert_array_equal(three_d, want[:6])
    # a row of several blocks is the concatenation of its blocks quantized alone
    wide = x[[1, 2, 3]].reshape(1, 3 * 512)
    np.testing.assert_array_equal(quantize(wide, qtype), want[[1, 2, 3]].reshape(1, -1))


@pytest.mark.parametrize("qtype", TYPES)
def test_all_zero_rows(qtype):
    blck, nbytes = BLOCK[qtype]
    x = np.zeros((3, 2 * 256), dtype=np.float32)
    q = quantize(x, qtype)
    assert q.shape == (3, 2 * 256 // blck * nbytes)
    if qtype == "iq4_nl":
        # ggml: d = 0 and every index re-picked for 0.0 -> level 1 (index 8) in both nibbles
        blocks = q.reshape(-1, nbytes)
        assert (blocks[:, :2] == 0).all() and (blocks[:, 2:] == 0x88).all()
    else:
        assert (q == 0).all()
    assert (dequantize(q, qtype, x.shape) == 0).all()


def test_parallel_rows_bit_identical():
    """Row-parallel quantization must not change a byte with 1 or 2 threads."""
    x = (np.random.default_rng(3).standard_normal((9, 512)) * 0.05).astype(np.float32)
    old = numba.get_num_threads()
    try:
        for qtype in ("q4_k", "q6_k"):
            numba.set_num_threads(1)
            one = quantize(x, qtype)
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            two = quantize(x, qtype)
            np.testing.assert_array_equal(one, two)
    finally:
        numba.set_num_threads(old)


def test_rmse_decreases_with_bits():
    x = np.random.default_rng(11).standard_normal((8, 1024)).astype(np.float32)
    rmse = {}
    for qtype in TYPES:
        err = dequantize(quantize(x, qtype), qtype, x.shape) - x
        rmse[qtype] = float(np.sqrt(np.mean(err ** 2)))
    assert rmse["q2_k"] > rmse["q3_k"] > rmse["q4_k"] > rmse["q5_k"] > rmse["q6_k"], rmse
    # sanity levels for unit gaussians (ggml's published numbers are ~0.25/0.12/0.06/0.03/0.015 of sigma)
    assert rmse["q2_k"] < 0.4 and rmse["q6_k"] < 0.03, rmse
    assert rmse["q4_k"] < rmse["iq4_nl"] < rmse["q3_k"], rmse


@pytest.mark.parametrize("qtype", TYPES)
def test_extreme_values_stay_finite_and_close(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[0] *= 1e-3              # small (much smaller underflows the fp16 scales: ggml gives zeros or worse)
    x[1, 17] = 500.0          # one outlier
    x[2] = 3.0                # constant row (max == min for the asymmetric types)
    x[3] *= 1000.0            # scales near the top of fp16
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    assert np.isfinite(y).all()
    rel = np.sqrt(np.mean((y - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
    assert (rel < 0.6).all(), rel


@pytest.mark.parametrize("qtype", TYPES)
def test_bad_shapes_raise_quant_error(qtype):
    with pytest.raises(QuantError):
        quantize(np.zeros((2, 100), np.float32), qtype)
    with pytest.raises(QuantError):
        dequantize(np.zeros(10, np.uint8), qtype, (1, 256))
