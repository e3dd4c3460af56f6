"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against ggml's own bytes and against gguf-py (independent references)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmrun.errors import QuantError
from llmrun.quants import dequantize, quantize

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
N_SCALES = {"q4_0": 1, "q4_1": 2, "q5_0": 1, "q5_1": 2, "q8_0": 1}


def _gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name.upper()]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def hard_rows() -> np.ndarray:
    """Rows that stress the rounding rules: outliers, ties, all-zero and constant blocks, tiny values."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    x[1] *= 1e-6
    x[2, 5] = 300.0                      # outlier
    x[3] = 0.0                           # all-zero blocks
    x[4] = 0.75                          # constant blocks: max == min
    x[5, :32] = np.arange(32) - 16        # integer codes hit exact .5 boundaries
    x[6, :32] = -(np.arange(32) - 16)     # negative signed max
    x[7, :32] = 1.0
    x[7, 7] = -1.0                       # |max| ties: the first one wins
    x[8] = rng.integers(-127, 128, 256).astype(np.float32) / 127.0
    x[9] = np.clip(x[9], -3, 3) * 21000  # values and _1 minimums near the fp16 limit
    return x


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_matches_ggml_bytes(quant_vectors, qtype):
    x = quant_vectors["x"]
    got = quantize(x, qtype)
    want = quant_vectors[qtype]
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", LEGACY)
def test_dequantize_matches_ggml(quant_vectors, qtype):
    x = quant_vectors["x"]
    got = dequantize(quant_vectors[qtype], qtype, x.shape)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(_bits(got), _bits(quant_vectors[f"{qtype}_dequant"]))


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_matches_gguf_py(hard_rows, qtype):
    want = gguf_quants.quantize(hard_rows, _gguf_type(qtype))
    np.testing.assert_array_equal(quantize(hard_rows, qtype), want)


@pytest.mark.parametrize("qtype", LEGACY)
def test_dequantize_random_blocks_matches_gguf_py(qtype):
    rng = np.random.default_rng(7)
    n_rows, n_cols = 12, 128
    raw = rng.integers(0, 256, (n_rows, n_cols // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
    # random but finite fp16 scales (random bytes could be inf/NaN, which tells nothing)
    scales = (rng.standard_normal((n_rows, n_cols // 32, N_SCALES[qtype])) * 0.05).astype(np.float16)
    raw[..., :2 * N_SCALES[qtype]] = scales.view(np.uint8)
    raw = raw.reshape(n_rows, -1)
    want = gguf_quants.dequantize(raw, _gguf_type(qtype))
    got = dequantize(raw, qtype, (n_rows, n_cols))
    np.testing.assert_array_equal(_bits(got), _bits(want))


@pytest.mark.parametrize("qtype", LEGACY)
def test_round_trip_error_is_within_the_format_step(hard_rows, qtype):
    x = hard_rows[[0, 2, 5, 8]]  # not the 1e-6 row: its scales underflow fp16
    y = dequantize(quantize(x, qtype), qtype, x.shape)
    bx, by = x.reshape(-1, 32), y.reshape(-1, 32)
    amax, lo, hi = np.abs(bx).max(1), bx.min(1), bx.max(1)
    # the code grid step d, and how far from the grid a value may land: half a step when rounding,
    # a whole step for the value opposite the signed max in _0 types (it clamps to code 7 / 15)
    d, reach = {"q4_0": (amax / 8, 1.0), "q5_0": (amax / 16, 1.0), "q8_0": (amax / 127, 0.5),
                "q4_1": ((hi - lo) / 15, 0.5), "q5_1": ((hi - lo) / 31, 0.5)}[qtype]
    fp16_slack = 2.0**-9 * (amax + (hi - lo))  # d and m are stored rounded to fp16
    assert np.all(np.abs(bx - by).max(1) <= reach * d + fp16_slack)


@pytest.mark.parametrize("qtype", LEGACY)
def test_all_zero_input_gives_zero_scale_and_zeros(qtype):
    x = np.zeros((2, 64), dtype=np.float32)
    raw = quantize(x, qtype)
    assert raw.shape == (2, 2 * BLOCK_BYTES[qtype])
    blocks = raw.reshape(-1, BLOCK_BYTES[qtype])
    assert np.all(np.ascontiguousarray(blocks[:, :2]).view("<f2") == 0)  # d is 0 (-0.0 for the _0 types, as ggml)
    np.testing.assert_array_equal(dequantize(raw, qtype, x.shape), x)


def test_shapes_are_kept_for_higher_rank_tensors():
    x = np.random.default_rng(3).standard_normal((3, 4, 64)).astype(np.float32)
    raw = quantize(x, "q8_0")
    assert raw.shape == (12, 68)
    np.testing.assert_array_equal(raw, quantize(x.reshape(12, 64), "q8_0"))
    assert dequantize(raw, "q8_0", (3, 4, 64)).shape == (3, 4, 64)


@pytest.mark.parametrize("qtype", LEGACY)
def test_scale_overflowing_fp16_is_an_error_like_llama_quantize(qtype):
    x = np.zeros((1, 64), dtype=np.float32)
    x[0, 40] = -3e9  # every type's scale (or minimum) for this block is beyond 65504
    with pytest.raises(QuantError, match=f"{qtype}.*fp16"):
        quantize(x, qtype)


def test_q8_0_rounds_half_away_from_zero():
    # amax 127 gives d = 1 exactly, so the codes are roundf(x): C's roundf sends .5 away from zero
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :7] = [127.0, 2.5, -2.5, 0.5, -0.5, 3.5, 1.4999999]
    codes = quantize(x, "q8_0")[0, 2:].view(np.int8)
    np.testing.assert_array_equal(codes[:7], [127, 3, -3, 1, -1, 4, 1])


def test_q4_0_truncates_toward_zero_after_adding_8_5():
    # signed max -8 gives d = 1, id = 1: code = min(15, trunc(x + 8.5))
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :6] = [-8.0, 7.4, 7.5, 6.5, -0.5, -7.6]
    raw = quantize(x, "q4_0")[0]
    codes = np.concatenate([raw[2:] & 0x0F, raw[2:] >> 4])
    np.testing.assert_array_equal(codes[:6], [0, 15, 15, 15, 8, 0])
    np.testing.assert_array_equal(codes[6:], 8)


def test_row_length_must_be_a_multiple_of_32():
    with pytest.raises(QuantError, match="multiple"):
        quantize(np.ones((2, 48), dtype=np.float32), "q4_0")


def test_wrong_byte_count_is_reported():
    with pytest.raises(QuantError, match="bytes"):
        dequantize(np.zeros(17, dtype=np.uint8), "q4_0", (1, 32))


def test_requantizing_llama_cpp_q8_0_rows_gives_back_their_bytes(default_model):
    # llama.cpp wrote token_embd as Q8_0; every block's extreme weight decodes to +-127*d, so quantizing
    # the decoded rows again must reproduce llama.cpp's bytes exactly (real data, not synthetic).
    from llmrun.gguf import GGUFReader
    with GGUFReader(default_model) as r:
        ti = r.tensors["token_embd.weight"]
        assert ti.ggml_type == 8  # Q8_0
        rows = np.array(ti.data[1000:1064])
    x = dequantize(rows, "q8_0", (64, ti.shape[1]))
    np.testing.assert_array_equal(quantize(x, "q8_0"), rows)
