"""Engine kernels against independent references: gguf-py's dequantizers for every weight type, numpy
float64 for products and the attention / norm ops."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from llmrun.kernels import dequantize_rows, matmul, matvec, matvec_batch, pack_matrix
from llmrun.kernels import ops
from llmrun.kernels.qmatmul import FEW_TOKENS, VNNI, _matmul_vnni, _matmul_widened

# f16 scale fields per block (byte offsets), set to sane values in random blocks so that every code value
# is exercised with finite, realistic scales.
_SCALE_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "q8_0": [0], "iq4_nl": [0],
                 "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}
TYPES = ["f32", "f16", "bf16"] + list(_SCALE_FIELDS)


def _random_rows(rng, name, rows, cols):
    qt = gguf.GGMLQuantizationType[name.upper()]
    if name == "f32":
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8), qt
    if name == "f16":
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8), qt
    if name == "bf16":
        f = rng.standard_normal((rows, cols)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), qt
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (rows, cols // blck, size), dtype=np.uint8)
    for off in _SCALE_FIELDS[name]:
        scale = rng.uniform(0.001, 0.02, raw.shape[:2]) * rng.choice([-1, 1], raw.shape[:2])
        raw[..., off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(raw.shape[:2] + (2,))
    return raw.reshape(rows, -1), qt


@pytest.mark.parametrize("name", TYPES)
def test_packed_matmul_matches_gguf_py_dequantize(name):
    rng = np.random.default_rng(TYPES.index(name))
    rows, cols = 70, 512   # 70: a partial last row tile
    raw, qt = _random_rows(rng, name, rows, cols)
    ref = gguf.quants.dequantize(raw, qt).reshape(rows, cols).astype(np.float64)
    pm = pack_matrix(raw, int(qt), cols)
    # embedding rows: exact
    pick = np.array([0, 5, 31, 32, 69])
    np.testing.assert_array_equal(dequantize_rows(pm, pick), ref[pick].astype(np.float32))
    # products: few tokens (decode kernels: int16 activations for the block types) and many (prefill: the
    # VNNI integer GEMM, int16 activations, on AVX-512 VNNI hosts; else float32 activations, row chunks
    # widened for BLAS)
    X = rng.standard_normal((70, cols)).astype(np.float32)
    want = X.astype(np.float64) @ ref.T
    blocks = name not in ("f32", "f16", "bf16")
    for T in (1, 3, 70):
        got = matmul(pm, X[:T])
        assert got.shape == (T, rows)
        err = np.abs(got - want[:T]).max() / np.abs(want[:T]).max()
        int16_acts = blocks and (T <= FEW_TOKENS or VNNI)
        bound = 1e-4 if int16_acts else 5e-6   # f16/bf16: float32 math
        assert err < bound, (T, err)
    if blocks:   # both prefill paths, whichever matmul picks on this host
        got = _matmul_widened(pm, X)[:, :rows]
        assert np.abs(got - want).max() / np.abs(want).max() < 5e-6
        if VNNI:
            for T in (4, 13):   # token groups of 6: padding tokens in the last group
                got = _matmul_vnni(pm, X[:T])
                assert got.shape == (T, rows)
                assert np.abs(got - want[:T]).max() / np.abs(want[:T]).max() < 1e-4




@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "q4_k", "q6_k", "f16"])
def test_matvec_batch_rows_equal_matvec(name):
    """Continuous batching decodes several sequences in one pass over the weights; each row must be exactly
    what that sequence's own decode step computes (so answers do not depend on what else runs), and close
    to gguf-py's dequantized product."""
    rng = np.random.default_rng(11)
    rows, cols = 70, 512
    raw, qt = _random_rows(rng, name, rows, cols)
    ref = gguf.quants.dequantize(raw, qt).reshape(rows, cols).astype(np.float64)
    pm = pack_matrix(raw, int(qt), cols)
    X = rng.standard_normal((8, cols)).astype(np.float32)
    for T in (2, 5, 8):
        got = matvec_batch(pm, X[:T])
        for i in range(T):
            np.testing.assert_array_equal(got[i], matvec(pm, X[i]))
        want = X[:T].astype(np.float64) @ ref.T
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
        acc = np.ones((T, rows), np.float32)
        matvec_batch(pm, X[:T], acc, accumulate=True)
        np.testing.assert_array_equal(acc, np.float32(1) + got)

# Repacked bytes per weight vs ggml's (the RSS bound after load: file + KV cache + 15 %). Q4_0, Q4_1, Q8_0 and Q6_K
# keep ggml's exact size (codes + half scales; Q6_K's int8 sub-block scales as in the file); Q4_K and Q5_K add
# 0.125 bit (6-bit sub-block scales and offsets held as bytes). Q5_0 and Q5_1 (U5) keep ggml's exact size too;
# Q3_K is held in U4 with 16-weight blocks (4-bit codes and int8 sub-block scales: 3.44 -> 4.56 bits), Q2_K in U2
# (2-bit codes, int8 sub-block scales and offsets: 2.63 -> 3.13 bits); IQ4_NL in I8 (its codes are table values).
_MAX_SIZE_RATIO = {"q4_0": 1.0, "q4_1": 1.0, "q8_0": 1.0, "q5_0": 1.0, "q5_1": 1.0, "iq4_nl": 1.9,
                   "q4_k": 1.028, "q5_k": 1.023, "q6_k": 1.0, "q3_k": 1.33, "q2_k": 1.191}


@pytest.mark.parametrize("name", list(_MAX_SIZE_RATIO))
def test_repacked_size_close_to_ggml(name):
    rng = np.random.default_rng(7)
    rows, cols = 128, 512   # whole tiles: no padding rows
    raw, qt = _random_rows(rng, name, rows, cols)
    pm = pack_matrix(raw, int(qt), cols)
    assert pm.nbytes <= _MAX_SIZE_RATIO[name] * raw.nbytes, pm.nbytes / raw.nbytes

def test_rmsnorm_and_swiglu():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    ops.rmsnorm(x, w, np.float32(1e-5), out)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    gu = rng.standard_normal((3, 2 * 48)).astype(np.float32)
    a = np.empty((3, 48), np.float32)
    ops.swiglu(gu, 48, a)
    g, u = gu[:, :48].astype(np.float64), gu[:, 48:]
    np.testing.assert_allclose(a, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["attention", "attention_blas"])
def test_attention_causal_gqa(kernel, monkeypatch):
    rng = np.random.default_rng(1)
    T, n_head, n_kv, hd, pos0, n_ctx = 7, 6, 2, 16, 3, 12
    monkeypatch.setattr(ops, "QUERY_CHUNK", 3)   # several query chunks
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    kc = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    vc = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float32)
    out = np.empty((T, n_head * hd), np.float32)
    k_blocks = np.ascontiguousarray(kc.transpose(0, 2, 1))[:, None]   # K transposed, one block (kv_formats.py)
    getattr(ops, kernel)(q, k_blocks, vc, pos0, np.float32(0.25), out)
    for t in range(T):
        for h in range(n_head):
            g = h // (n_head // n_kv)
            n = pos0 + t + 1   # causal: positions 0..pos0+t only
            s = kc[g, :n].astype(np.float64) @ q[t, h] * 0.25
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[t, h * hd:(h + 1) * hd], p @ vc[g, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(_SCALE_FIELDS))
def test_quads_and_byte_rows_give_the_same_bits(name):
    """repack.py's two code layouts: every kernel that reads either (the portable one-token and batched products,
    the widening prefill, row dequantization, and matvec's dispatch: VNNI on quads where the host has it) gives
    bit-identical results for the same rows."""
    from llmrun.kernels import gemv
    from llmrun.kernels.blocks import _scale_args
    rng = np.random.default_rng(100 + list(_SCALE_FIELDS).index(name))
    rows, cols = 150, 768
    raw, qt = _random_rows(rng, name, rows, cols)
    quads, byte_rows = (pack_matrix(raw, int(qt), cols, quads=q) for q in (True, False))
    assert quads.codes.shape[-1] == 4 and byte_rows.codes.shape[-1] == 1
    # byte j of row r: [t, b, j // 4, r, j % 4] in quads, [t, b, j, r, 0] in byte rows
    t_, b_, n4, R_, _ = quads.codes.shape
    np.testing.assert_array_equal(quads.codes.transpose(0, 1, 2, 4, 3).reshape(t_, b_, 4 * n4, R_),
                                  byte_rows.codes[..., 0])
    X = rng.standard_normal((3, cols)).astype(np.float32)
    for kernel in (gemv._gemv, gemv._gemv_batch):
        outs = []
        for pm in (quads, byte_rows):
            y = np.zeros((3, rows), np.float32)
            args = (pm.codes, pm.code_kind, *_scale_args(pm), pm.zero)
            if kernel is gemv._gemv:
                for i in range(3):
                    kernel(*args, X[i], y[i], False)
            else:
                kernel(*args, X, y, False)
            outs.append(y)
        np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
    np.testing.assert_array_equal(_matmul_widened(quads, X), _matmul_widened(byte_rows, X))
    picks = [0, 63, 64, 149]
    np.testing.assert_array_equal(dequantize_rows(quads, picks), dequantize_rows(byte_rows, picks))
    np.testing.assert_array_equal(matvec(quads, X[0]).view(np.uint32), matvec(byte_rows, X[0]).view(np.uint32))


def _row_bytes(pm):
    """A byte-rows PackedMatrix's codes as bytes per row and block [n_rows, nblk, bytes] (repack.py's layout)."""
    t, nblk, n, R, _ = pm.codes.shape
    return pm.codes[..., 0].transpose(0, 3, 1, 2).reshape(t * R, nblk, n)[:pm.n_rows]


def test_six_bit_layout():
    """repack.py's U6 bytes of Q6_K rows, bit by bit as its doc says (byte j < 8: code j low nibble, code j + 8
    high; byte 8 + i: bits 4-5 of code 4g + i at bits 2g), against the codes ggml's block holds (docs/formats.md:
    weight 128h + 32c + l = nibble c // 2 of ql[64h + 32 (c % 2) + l], bits 2c of qh[32h + l]), and back."""
    from llmrun.kernels.repack import six_bit_codes
    rng = np.random.default_rng(3)
    raw, qt = _random_rows(rng, "q6_k", 50, 256)
    ql, qh = raw[:, 0:128], raw[:, 128:192]
    w = np.arange(256)
    h, c, l = w // 128, (w // 32) % 4, w % 32
    q = ((ql[:, 64 * h + 32 * (c % 2) + l] >> (4 * (c // 2))) & 15) | (((qh[:, 32 * h + l] >> (2 * c)) & 3) << 4)
    q = q.reshape(50, 16, 16).astype(np.uint8)
    b = _row_bytes(pack_matrix(raw, int(qt), 256, quads=False))
    assert b.shape == (50, 16, 12) and b.dtype == np.uint8
    for j in range(16):
        nib = (b[..., j % 8] >> (4 * (j // 8))) & 15
        hb = (b[..., 8 + j % 4] >> (2 * (j // 4))) & 3
        np.testing.assert_array_equal(nib | (hb << 4), q[..., j])
    np.testing.assert_array_equal(six_bit_codes(b), q)


@pytest.mark.parametrize("name", TYPES)
def test_packing_in_parts_is_packing_the_whole(name):
    """Fused tensors (Q, K and V) are packed part by part at row offsets that are not tile multiples: the same
    PackedMatrix as packing their concatenated rows, in both code layouts."""
    rng = np.random.default_rng(7)
    raw, qt = _random_rows(rng, name, 250, 512)
    for quads in (True, False):
        whole = pack_matrix(raw, int(qt), 512, quads=quads)
        parts = pack_matrix([raw[:100], raw[100:130], raw[130:]], int(qt), 512, quads=quads)
        for f in ("family", "n_rows", "n_cols", "bs", "zero", "kind", "src_type"):
            assert getattr(parts, f) == getattr(whole, f)
        for f in ("codes", "d", "m"):
            a, b = getattr(whole, f), getattr(parts, f)
            assert type(a) is type(b)
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,)) if a is not None else ((), ())
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


def test_rows_of_the_wrong_length_are_a_model_error():
    from llmrun.errors import ModelError
    with pytest.raises(ModelError, match="take 144 bytes"):
        pack_matrix(np.zeros((4, 140), np.uint8), int(gguf.GGMLQuantizationType.Q4_K), 256)


_PACKED = {"q6_k": "u6", "q5_0": "u5", "q5_1": "u5", "q5_k": "u5",   # the types whose codes are held in fewer
           "q3_k": "u4", "q2_k": "u2", "q4_k": "u4"}              # than 8 bits (repack.py), U4 in 16- and 32-blocks


def _unpacked_as_i8(raw, qt, cols, quads):
    """The same rows with one byte per code: family I8 (the same zero point, scales and blocks), tiled like the
    packed matrix: the layout whose kernels the packed ones must reproduce bit for bit."""
    from llmrun.kernels import repack
    pm = pack_matrix(raw, int(qt), cols, quads=quads)
    t, nblk, n, R, E = pm.codes.shape
    rows = pm.codes.transpose(0, 1, 3, 2, 4).reshape(t, nblk, R, n * E)     # byte j of row r: [t, b, r, j]
    codes = (repack.five_bit_codes(rows) if pm.family == repack.U5 else repack.six_bit_codes(rows)
             if pm.family == repack.U6 else repack.crumb_codes(rows) if pm.family == repack.U2
             else repack.nibble_codes(rows))     # [t, b, r, bs]
    tiled = np.ascontiguousarray(codes.reshape(t, nblk, R, pm.bs // E, E).transpose(0, 1, 3, 2, 4))
    return repack.PackedMatrix(repack.I8, pm.n_rows, cols, tiled, pm.d, pm.m, pm.bs, zero=pm.zero, src_type=int(qt))


def test_five_bit_layout():
    """repack.py's U5 bytes of Q5_0 rows, bit by bit as its doc says (byte j < 16: code j low nibble, code j + 16
    high; byte 16 + i: bit 4 of code 4k + i at bit k), against the codes ggml's block holds (docs/formats.md: qs
    nibbles, bit j of qh), and back."""
    from llmrun.kernels import repack
    rng = np.random.default_rng(4)
    raw, qt = _random_rows(rng, "q5_0", 50, 256)
    blocks = raw.reshape(50, 8, 22)
    qh = blocks[..., 2:6].copy().view("<u4")[..., 0]
    qs = blocks[..., 6:22]
    j = np.arange(32)
    q = ((qs[..., j % 16] >> (4 * (j // 16))) & 15) | (((qh[..., None] >> j) & 1) << 4).astype(np.uint8)
    pm = pack_matrix(raw, int(qt), 256, quads=False)
    b = _row_bytes(pm)
    assert pm.family == repack.U5 and b.shape == (50, 8, 20) and b.dtype == np.uint8
    for c in range(32):
        nib = (b[..., c % 16] >> (4 * (c // 16))) & 15
        hb = (b[..., 16 + c % 4] >> (c // 4)) & 1
        np.testing.assert_array_equal(nib | (hb << 4), q[..., c])
    np.testing.assert_array_equal(repack.five_bit_codes(b), q)


def test_two_bit_layout():
    """repack.py's U2 bytes of Q2_K rows, bit by bit as its doc says (byte i: code 4k + i at bits 2k), against the
    codes ggml's block holds (docs/formats.md: weight 128h + 32s + l = bits 2s of qs[32h + l]), and back."""
    from llmrun.kernels import repack
    rng = np.random.default_rng(5)
    raw, qt = _random_rows(rng, "q2_k", 50, 512)
    qs = raw.reshape(50, 2, 84)[..., 16:80]
    w = np.arange(256)
    q = (qs[..., 32 * (w // 128) + w % 32] >> (2 * ((w // 32) % 4))) & 3     # [row, super-block, weight]
    q = q.reshape(50, 32, 16).astype(np.uint8)
    pm = pack_matrix(raw, int(qt), 512, quads=False)
    b = _row_bytes(pm)
    assert pm.family == repack.U2 and b.shape == (50, 32, 4) and b.dtype == np.uint8
    for c in range(16):
        np.testing.assert_array_equal((b[..., c % 4] >> (2 * (c // 4))) & 3, q[..., c])
    np.testing.assert_array_equal(repack.crumb_codes(b), q)


@pytest.mark.parametrize("quads", [True, False])
@pytest.mark.parametrize("name", list(_PACKED))
def test_packed_codes_give_i8_bits_on_every_path(name, quads):
    """Every type held as U5 (20 bytes per 32 codes), U6 (12 bytes per 16), U4 (a byte per two codes, in 32- and
    16-weight blocks) or U2 (4 bytes per 16 codes) gives, on every product path, exactly
    the bits of the same codes held one per byte (I8): decode (VNNI or portable, both layouts), batched decode
    (T = 2..9), both prefill paths, the widening kernel's float32 weights (equal to gguf-py's dequantization) and
    embedding rows."""
    from llmrun.kernels import gemm_blas, gemv, qmatmul
    from llmrun.kernels.blocks import _scale_args
    rng = np.random.default_rng(23 + list(_PACKED).index(name))
    rows, cols = 150, 768   # a partial last tile, three super-blocks
    raw, qt = _random_rows(rng, name, rows, cols)
    packed = pack_matrix(raw, int(qt), cols, quads=quads)
    i8 = _unpacked_as_i8(raw, qt, cols, quads)
    assert packed.family == _PACKED[name] and i8.family == "i8" and packed.bs == i8.bs
    bits = {"u2": 2, "u4": 4, "u5": 5, "u6": 6}[packed.family]
    assert packed.codes.nbytes * 8 == i8.codes.nbytes * bits
    X = (rng.standard_normal((9, cols)) * np.exp(rng.uniform(-3, 3, (9, cols)))).astype(np.float32)
    X[0, :16] = 0   # a zero block

    def same(a, b):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))

    for i in range(3):
        same(matvec(packed, X[i]), matvec(i8, X[i]))
    for T in range(2, 10):
        same(matvec_batch(packed, X[:T]), matvec_batch(i8, X[:T]))
    for kernel in (gemv._gemv, gemv._gemv_batch):   # the portable kernels, also where VNNI ones run
        ys = []
        for pm in (packed, i8):
            y = np.zeros((4, rows), np.float32)
            args = (pm.codes, pm.code_kind, *_scale_args(pm), pm.zero)
            if kernel is gemv._gemv:
                kernel(*args, X[1], y[0], False)
            else:
                kernel(*args, X[:4], y, False)
            ys.append(y)
        same(*ys)
    same(_matmul_widened(packed, X), _matmul_widened(i8, X))
    if VNNI and quads:
        same(_matmul_vnni(packed, X), _matmul_vnni(i8, X))
    ref = gguf.quants.dequantize(raw, qt).reshape(rows, cols)
    w = np.empty((3, cols, 64), np.float32)
    gemm_blas._widen(packed.codes, packed.code_kind, *_scale_args(packed), packed.zero, 0, 3, w)
    np.testing.assert_array_equal(w.transpose(0, 2, 1).reshape(-1, cols)[:rows], ref)   # (values: -0 == 0)
    picks = [0, 1, 63, 64, 149]
    np.testing.assert_array_equal(dequantize_rows(packed, picks), ref[picks])
    same(dequantize_rows(packed, picks), dequantize_rows(i8, picks))


@pytest.mark.parametrize("bs", [16, 32])
def test_activation_quantizer_against_numpy(bs):
    """The int16 activation codes every tiled product multiplies (blocks._quantize_activations, vector IR):
    numpy's round-half-even of x * 32767 / amax per block, the block's amax / 32767, the codes' exact sum and
    the block's float sum (its own fixed order: within float32 rounding of numpy's float64 sum)."""
    from numba import njit

    from llmrun.kernels.blocks import _quantize_activations

    @njit
    def quantize(x, bs, xq, xd, xsum, xqsum):
        _quantize_activations(x, bs, xq, xd, xsum, xqsum)

    rng = np.random.default_rng(bs)
    K = 512
    for scale in (1e-6, 1.0, 3e4):
        x = (rng.standard_normal(K) * scale).astype(np.float32)
        x[:bs] = 0.0                               # an all-zero block: scale 0, codes 0
        x[bs:2 * bs] = 0.5
        x[bs + 1] = np.float32(-1.0)               # halves land on .5 exactly: round half to even
        xq = np.empty(K, np.int16)
        xd, xsum = np.empty(K // bs, np.float32), np.empty(K // bs, np.float32)
        xqsum = np.empty(K // bs, np.int32)
        quantize(x, bs, xq, xd, xsum, xqsum)
        blocks = x.reshape(-1, bs)
        amax = np.abs(blocks).max(axis=1)
        inv = np.where(amax > 0, np.float32(32767.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        want = np.rint(blocks * inv[:, None]).astype(np.int16)
        np.testing.assert_array_equal(xq.reshape(-1, bs), want)
        np.testing.assert_array_equal(xd, amax / np.float32(32767.0))
        np.testing.assert_array_equal(xqsum, want.astype(np.int64).sum(axis=1))
        ref = blocks.astype(np.float64).sum(axis=1)
        bound = bs * 6e-8 * np.abs(blocks).max(axis=1).astype(np.float64)   # bs roundings of at most amax
        assert np.all(np.abs(xsum - ref) <= bound)
    assert xq[bs + 2] == 16384 and xq[bs + 1] == -32767   # 0.5 * 32767 = 16383.5 -> 16384 (even)
