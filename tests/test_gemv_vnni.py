"""kernels/gemv_vnni.py: the vpdpbusd one-token product gives exactly the portable kernel's bits (gemv.py's
_gemv: the same integer block sums, the same float epilogue) for every tiled quant type; its
closeness to gguf-py's dequantized product is checked through matvec in test_kernels.py."""
from __future__ import annotations

import numpy as np
import pytest

from llmrun.kernels import matvec, pack_matrix
from llmrun.kernels import gemv, qmatmul
from test_kernels import _SCALE_FIELDS, _random_rows

pytestmark = pytest.mark.skipif(not qmatmul.VNNI_GEMV, reason="needs AVX-512 VNNI (other hosts run gemv.py's kernels)")


def _activations(rng, cols):
    """Random activations with the cases the byte split must get right: a zero block (scale 0), a block of
    one sign, a block with one dominant value (codes +-32767 next to tiny ones), and mixed magnitudes."""
    x = (rng.standard_normal(cols) * np.exp(rng.uniform(-3, 3, cols))).astype(np.float32)
    x[0:32] = 0
    x[32:64] = np.abs(x[32:64])
    x[64:96] = -np.abs(x[64:96]) * 1e-3
    x[70] = -50.0
    x[96:128] = rng.integers(-2, 3, 32).astype(np.float32)
    return x


@pytest.mark.parametrize("name", list(_SCALE_FIELDS))
def test_vnni_gemv_bit_identical_to_portable(name):
    from llmrun.kernels.gemv_vnni import _gemv_vnni
    rng = np.random.default_rng(list(_SCALE_FIELDS).index(name))
    rows, cols = 150, 768   # 150: a partial last tile; 768: three 256-blocks (K-quant super-blocks)
    raw, qt = _random_rows(rng, name, rows, cols)
    pm = pack_matrix(raw, int(qt), cols)
    args = (pm.code_kind, *qmatmul._scale_args(pm), pm.zero)
    for _ in range(3):
        x = _activations(rng, cols)
        for accumulate in (False, True):
            want = np.linspace(-1, 1, rows).astype(np.float32)
            got = want.copy()
            gemv._gemv(pm.codes, *args, x, want, accumulate)
            _gemv_vnni(pm.codes, *args, x, got, accumulate)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    y = np.empty(rows, np.float32)
    gemv._gemv(pm.codes, *args, x, y, False)
    np.testing.assert_array_equal(matvec(pm, x), y)   # the kernel matvec dispatches to


def test_extreme_codes_and_activations():
    """All-255 Q8_0-shifted codes (c ^ 0x80 = 127) and all-0 codes against activation codes of +-32767 and
    -32768-adjacent values: the largest sums the split must keep exact in int32."""
    from llmrun.kernels.gemv_vnni import _gemv_vnni
    rng = np.random.default_rng(5)
    raw, qt = _random_rows(rng, "q8_0", 64, 256)
    blocks = raw.reshape(64, 8, 34)
    blocks[:32, :, 2:] = 127            # int8 127 -> stored code 255
    blocks[32:, :, 2:] = 0x80           # int8 -128 -> stored code 0
    pm = pack_matrix(blocks.reshape(64, -1), int(qt), 256)
    args = (pm.code_kind, *qmatmul._scale_args(pm), pm.zero)
    for x in (np.full(256, 3.0, np.float32), np.full(256, -3.0, np.float32),
              np.where(np.arange(256) % 2, 1.0, -1.0).astype(np.float32)):
        want, got = np.empty(64, np.float32), np.empty(64, np.float32)
        gemv._gemv(pm.codes, *args, x, want, False)
        _gemv_vnni(pm.codes, *args, x, got, False)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
