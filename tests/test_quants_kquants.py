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
    # a long row (several search chunks) is the concatenation of its blocks quantized alone
    rows = [1, 2, 3, 12, 15, 19, 20, 21, 23]
    wide = x[rows].reshape(1, -1)
    np.testing.assert_array_equal(quantize(wide, qtype), want[rows].reshape(1, -1))


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


@pytest.fixture(scope="module")
def awkward_chunk() -> np.ndarray:
    """8 super-blocks of groups that push the searches into their corners."""
    rng = np.random.default_rng(99)
    x = (rng.standard_t(2, 8 * 256) * 0.03).astype(np.float32)
    x[0:32] = 0.0                                   # all-zero groups
    x[32:64] = 0.5                                  # flat groups (max == min)
    x[64:96] = np.round(rng.standard_normal(32) * 3)  # integers: rounding ties
    x[96:128] = rng.standard_normal(32) * 1e-20     # below ggml's 1e-15 "all zero" threshold in places
    x[128:160] = 0.0
    x[140] = 2.0                                    # one spike in a quiet group
    x[160:192] = np.abs(rng.standard_normal(32))    # one-signed groups
    x[192:224] = -np.abs(rng.standard_normal(32)) * 1e4
    x[300:800] *= 1e-4
    sparse = rng.random(8 * 256) < 0.7
    x[1024:][sparse[1024:]] = 0.0
    return x


def test_lane_searches_match_scalar_searches(awkward_chunk):
    """The SIMD-lane scale searches give the scalar (ggml-transcribed) searches' results exactly."""
    from llmrun.quants import kquants as kq
    from llmrun.quants import kquant_search as ks

    xs = awkward_chunk
    f32 = np.float32
    # Q4_K / Q5_K: groups of 32, weights rms + |x|
    for five in (False, True):
        nmax, rmin, nstep = (31, f32(-0.5), 15) if five else (15, f32(-1.0), 20)
        L = np.zeros(xs.size, np.int32)
        sc = np.zeros(xs.size // 32, f32)
        mn = np.zeros(xs.size // 32, f32)
        kq._search_q45_k(xs, L, sc, mn, five)
        w = np.empty(32, f32)
        for g in range(xs.size // 32):
            xg = xs[32 * g:32 * g + 32]
            kq._q45_weights(xg, w)
            Lg = np.zeros(32, np.int32)
            s, m = ks.make_qkx2_quants(32, nmax, xg, w, Lg, np.zeros(32, np.int32), rmin, f32(0.1), nstep, False)
            assert (_bits(s), _bits(m)) == (_bits(sc[g]), _bits(mn[g])), (five, g)
            np.testing.assert_array_equal(Lg, L[32 * g:32 * g + 32])
    # Q2_K: groups of 16, weights |x|, mean absolute error
    L = np.zeros(xs.size, np.int32)
    sc = np.zeros(xs.size // 16, f32)
    mn = np.zeros(xs.size // 16, f32)
    kq._search_q2_k(xs, L, sc, mn)
    for g in range(xs.size // 16):
        xg = xs[16 * g:16 * g + 16]
        Lg = np.zeros(16, np.int32)
        s, m = ks.make_qkx2_quants(16, 3, xg, np.abs(xg), Lg, np.zeros(16, np.int32), f32(-0.5), f32(0.1), 15, True)
        assert (_bits(s), _bits(m)) == (_bits(sc[g]), _bits(mn[g])), g
        np.testing.assert_array_equal(Lg, L[16 * g:16 * g + 16])
    # Q3_K and Q6_K: symmetric groups of 16
    for q3 in (True, False):
        L = np.zeros(xs.size, np.int32)
        sc = np.zeros(xs.size // 16, f32)
        kq._search_symmetric(xs, L, sc, q3)
        for g in range(xs.size // 16):
            xg = xs[16 * g:16 * g + 16]
            Lg = np.zeros(16, np.int32)
            s = ks.make_q3_quants(16, 4, xg, Lg) if q3 else ks.make_qx_quants(16, 32, xg, Lg)
            assert _bits(s) == _bits(sc[g]), (q3, g)
            np.testing.assert_array_equal(Lg, L[16 * g:16 * g + 16])


def test_nearest_int_matches_ggml_bit_trick():
    """nearest_int reproduces (bits(v + 1.5*2**23) & 0x7fffff) - 0x400000, in range and out of it."""
    from llmrun.quants.kquant_search import nearest_int

    rng = np.random.default_rng(1)
    v = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-3, 12, 2000),
                        np.array([0.5, 1.5, 2.5, -0.5, -2.5, 4194303.0, 4194304.5, -4194305.0, 1e30, -1e30,
                                  np.inf, -np.inf, -12582912.0, 3e7])]).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        t = (v + np.float32(12582912.0)).astype(np.float32)
    want = (t.view(np.uint32).astype(np.int64) & 0x7FFFFF) - 0x400000
    got = np.array([nearest_int(f) for f in v])
    np.testing.assert_array_equal(got, want)


def test_fp16_bits_match_numpy():
    from llmrun.quants.kquant_search import fp16_bits, fp16_value

    rng = np.random.default_rng(2)
    v = np.concatenate([rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 6, 3000),
                        np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 2.98e-8, 6.1e-5, np.inf])]
                       ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = v.astype("<f2").view(np.uint16)
    got = np.array([fp16_bits(f) for f in v], dtype=np.uint16)
    np.testing.assert_array_equal(got, want)
    back = np.array([fp16_value(int(h)) for h in want], dtype=np.float32)
    np.testing.assert_array_equal(_bits(back), _bits(want.view("<f2").astype(np.float32)))


def _ggml_best_index(values, x):
    """ggml's best_index_int8 (binary search version), in float32 like the C code."""
    x = np.float32(x)
    if x <= values[0]:
        return 0
    if x >= values[-1]:
        return len(values) - 1
    lo, hi = 0, len(values) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < values[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - np.float32(values[hi - 1])) < np.float32(np.float32(values[hi]) - x) else hi


def test_iq4_nl_level_choice_matches_ggml_search():
    from llmrun.ggml import IQ4_NL_VALUES as KVALUES
    from llmrun.quants.iq4_nl import _IDX_TAB, _LEVEL_TAB, _level_slot

    values = [int(v) for v in KVALUES]
    mids = [(a + b) / 2 for a, b in zip(values[:-1], values[1:])]
    rng = np.random.default_rng(4)
    probes = np.concatenate([
        rng.uniform(-140, 130, 4000), np.array(mids), np.nextafter(np.array(mids, np.float32), np.float32(-1e9)),
        np.nextafter(np.array(mids, np.float32), np.float32(1e9)), np.array(values, np.float64),
        rng.standard_normal(500) * 1e-6, np.array([-1e30, 1e30, -200.0, 200.0, 0.0])]).astype(np.float32)
    for v in probes:
        slot = _level_slot(v)
        want = _ggml_best_index(values, v)
        assert _IDX_TAB[slot] == want, (v, _IDX_TAB[slot], want)
        assert _LEVEL_TAB[slot] == values[want]
