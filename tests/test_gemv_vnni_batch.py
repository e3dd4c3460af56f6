"""kernels/gemv_vnni_batch.py: the batched decode kernel gives, for every token, exactly the one-token kernel's
bits (gemv_vnni._gemv_vnni, itself bit-identical to the portable gemv._gemv: tests/test_gemv_vnni.py)
for every tiled quant type, any number of tokens (whole and partial token groups), partial row tiles and
accumulate; its closeness to gguf-py's dequantized product is checked through matvec_batch in test_kernels.py."""
from __future__ import annotations

import numpy as np
import pytest

from llmrun.kernels import matvec, matvec_batch, pack_matrix
from llmrun.kernels import qmatmul
from test_gemv_vnni import _activations
from test_kernels import _SCALE_FIELDS, _random_rows

pytestmark = pytest.mark.skipif(not qmatmul.VNNI_GEMV, reason="needs AVX-512 VNNI (other hosts run qmatmul's kernels)")


@pytest.mark.parametrize("name", list(_SCALE_FIELDS))
def test_batch_rows_bit_identical_to_one_token(name):
    from llmrun.kernels.gemv_vnni import _gemv_vnni
    from llmrun.kernels.gemv_vnni_batch import gemv_batch_vnni
    rng = np.random.default_rng(100 + list(_SCALE_FIELDS).index(name))
    rows, cols = 150, 768   # 150: a partial last tile; 768: three 256-blocks (K-quant super-blocks)
    raw, qt = _random_rows(rng, name, rows, cols)
    pm = pack_matrix(raw, int(qt), cols)
    args = (pm.codes, pm.code_kind, *qmatmul._scale_args(pm), pm.zero)
    X = np.stack([_activations(rng, cols) for _ in range(9)])
    for T in range(1, 10):   # 1..9: one token, whole groups of 4 and partial ones
        for accumulate in (False, True):
            start = rng.standard_normal((T, rows)).astype(np.float32)
            want = start.copy()
            for i in range(T):
                _gemv_vnni(*args, X[i], want[i], accumulate)
            got = start.copy()
            gemv_batch_vnni(*args, X[:T], got, accumulate)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got = matvec_batch(pm, X[:5])   # the kernel matvec_batch dispatches to
    for i in range(5):
        np.testing.assert_array_equal(got[i].view(np.uint32), matvec(pm, X[i]).view(np.uint32))


def test_extreme_codes_and_activations():
    """All-255 and all-0 I8 codes against activation codes of +-32767 in every token: the largest block sums,
    where the high bytes' sums are shifted before the low bytes' are added."""
    from llmrun.kernels.gemv_vnni import _gemv_vnni
    from llmrun.kernels.gemv_vnni_batch import gemv_batch_vnni
    rng = np.random.default_rng(7)
    raw, qt = _random_rows(rng, "q8_0", 64, 256)
    blocks = raw.reshape(64, 8, 34)
    blocks[:32, :, 2:] = 127            # int8 127 -> stored code 255
    blocks[32:, :, 2:] = 0x80           # int8 -128 -> stored code 0
    pm = pack_matrix(blocks.reshape(64, -1), int(qt), 256)
    args = (pm.codes, pm.code_kind, *qmatmul._scale_args(pm), pm.zero)
    X = np.stack([np.full(256, 3.0, np.float32), np.full(256, -3.0, np.float32),
                  np.where(np.arange(256) % 2, 1.0, -1.0).astype(np.float32), np.zeros(256, np.float32),
                  np.full(256, 1e-30, np.float32)])
    want = np.empty((5, 64), np.float32)
    for i in range(5):
        _gemv_vnni(*args, X[i], want[i], False)
    got = np.empty((5, 64), np.float32)
    gemv_batch_vnni(*args, X, got, False)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
