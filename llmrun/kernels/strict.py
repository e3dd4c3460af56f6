"""Float arithmetic whose rounding the source fixes: explicit fused multiply-adds, and an exp made of them.

Kernels that must give the same bits in differently shaped loops use these (prefill, decode and batched decode
give the same logits: docs/kernels.md, "Batch invariance"). Under fast-math LLVM may contract `a*b + c` into an
FMA, or reorder a sum, differently in each kernel a helper is inlined into; a call of llvm.fma is never split
or reordered, and a loop of them still vectorizes. `fma_ir` emits the same call from hand-written LLVM IR.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kv_formats import _as_f32


def fma_ir(builder, a, b, c):
    """a * b + c rounded once (llvm.fma on float32 scalars or vectors of them)."""
    ty = a.type
    name = "llvm.fma.f32" if isinstance(ty, ir.FloatType) else f"llvm.fma.v{ty.count}f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
    return builder.call(fn, [a, b, c])


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (float32)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return fma_ir(builder, *args)
    return sig, codegen


# exp(x) = 2**k * exp(r), x = k ln2 + r, |r| <= ln2/2; exp(r) by Cephes' expf polynomial (~1 ulp).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(-0.693359375)        # -ln2 in two parts: k * _LN2_HI is exact
_LN2_LO = np.float32(2.12194440e-4)
_EXP_MIN = np.float32(-87.33654)          # exp(_EXP_MIN) = 2**-126, the smallest normal float32
_EXP_MAX = np.float32(88.0)               # 2**k stays finite
P0, P1, P2, P3, P4, P5 = (np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                   4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


@njit(inline="always")
def exp(x):
    """float32 exp in plain arithmetic, ~1 ulp (numba's calls libm's expf one element at a time; a loop of
    this vectorizes). NaN stays NaN; below the normal range 0, above 88 inf."""
    nan = x != x
    xc = np.float32(0.0) if nan else _EXP_MIN if x < _EXP_MIN else _EXP_MAX if x > _EXP_MAX else x
    k = np.floor(fma(xc, _LOG2E, np.float32(0.5)))
    r = fma(k, _LN2_HI, xc)
    r = fma(k, _LN2_LO, r)
    p = fma(P0, r, P1)
    p = fma(p, r, P2)
    p = fma(p, r, P3)
    p = fma(p, r, P4)
    p = fma(p, r, P5)
    p = fma(p, r * r, r) + np.float32(1.0)
    y = p * _as_f32(np.uint32((np.int32(k) + np.int32(127)) << np.int32(23)))
    return x if nan else np.float32(0.0) if x < _EXP_MIN else np.float32(np.inf) if x > _EXP_MAX else y
