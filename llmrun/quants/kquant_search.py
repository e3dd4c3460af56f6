"""ggml's scale searches for the K-quants (docs/formats.md §3.0, §3.2): scalar transcriptions of
make_qkx2_quants / make_qx_quants / make_q3_quants, and "lane" versions that run many groups at once.

Bit-exactness with ggml's C reference depends on doing what C does with float32:
  * every constant and intermediate is np.float32 (numba promotes float32 * int to float64, so ints are
    cast first), products are evaluated left to right, sums accumulate sequentially, no fastmath;
  * nearest_int is the 1.5*2**23 trick *including* what it returns for out-of-range input (the searches
    can feed it huge quotients, and ggml clamps whatever comes out);
  * scales stored as fp16 are rounded to nearest-even and the rounded value is used for re-quantization;
  * a division by zero yields inf/nan as in C (error_model="numpy"), never an exception.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
_IN_RANGE = np.float32(4194303.0)
I0 = np.int32(0)


@njit(cache=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """ggml's nearest_int(float): low 23 mantissa bits of (fval + 1.5*2**23), minus 2**22.

    In range (|fval| <= 2**22 - 1) that is round-half-even; outside it we reproduce the bit pattern."""
    val = np.float32(fval + _MAGIC)
    if abs(fval) <= _IN_RANGE:
        return np.int64(val) - 12582912
    return _nearest_int_slow(val)


@njit(cache=True, error_model="numpy")
def _nearest_int_slow(val):
    # (bits(val) & 0x7fffff) - 0x400000, computed from the value instead of a bit cast.
    if math.isnan(val):
        return 0  # x86's default NaN is 0xFFC00000: mantissa 0x400000
    if math.isinf(val):
        return -0x400000
    a = abs(np.float64(val))
    if a == 0.0:
        return -0x400000
    mant, ex = math.frexp(a)  # a = mant * 2**ex, mant in [0.5, 1)
    if ex <= -126:  # float32 subnormal: the mantissa field is a / 2**-149
        field = np.int64(a * 2.0 ** 149)
    else:
        field = np.int64(mant * 2.0 ** 24) - 0x800000
    return field - 0x400000


@njit(cache=True, error_model="numpy")
def fp16_bits(v):
    """float32 -> IEEE half bits, round to nearest-even (same as numpy and ggml's F16C path)."""
    f = np.float64(v)
    sign = 0x8000 if math.copysign(1.0, f) < 0 else 0
    if math.isnan(f):
        return sign | 0x7E00
    a = abs(f)
    if a >= 65520.0:  # rounds to infinity
        return sign | 0x7C00
    if a < 2.0 ** -14:  # zero or subnormal: quantum 2**-24 (a 1024 rounds up into the first normal)
        return sign | np.int64(np.rint(a * 2.0 ** 24))
    mant, ex = math.frexp(a)  # a in [2**(ex-1), 2**ex): 11 significant bits -> quantum 2**(ex-11)
    q = np.int64(np.rint(a * 2.0 ** (11 - ex)))  # 1024..2048; 2048 carries into the exponent
    return sign | (((ex + 14) << 10) + q - 1024)


@njit(cache=True, error_model="numpy")
def fp16_value(h):
    """IEEE half bits -> float32."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        r = math.ldexp(np.float64(m), -24)
    elif e == 31:
        r = math.inf if m == 0 else math.nan
    else:
        r = math.ldexp(np.float64(1024 + m), e - 25)
    return np.float32(-r if h & 0x8000 else r)


@njit(cache=True, error_model="numpy", inline="always")
def put_fp16(out, off, v):
    """Store float32 v as fp16 at out[off:off+2] (little-endian); return the rounded value as float32."""
    h = fp16_bits(v)
    out[off] = h & 0xFF
    out[off + 1] = h >> 8
    return fp16_value(h)


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, w, L, Laux, rmin, rdelta, nstep, use_mad):
    """Weighted search for (scale, min) of an asymmetric nmax-level grid; fills L. Returns (scale, -min)."""
    fnmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = np.float32(sum_w * x[0])
    for i in range(1, n):
        xi = x[i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        wi = w[i]
        sum_w = np.float32(sum_w + wi)
        sum_x = np.float32(sum_x + np.float32(wi * xi))
    if mn > 0:
        mn = F32(0.0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F32(0.0), np.float32(-mn)
    iscale = np.float32(fnmax / np.float32(mx - mn))
    scale = np.float32(F32(1.0) / iscale)
    best_error = F32(0.0)
    for i in range(n):
        l = nearest_int(np.float32(iscale * np.float32(x[i] - mn)))
        l = max(0, min(nmax, l))
        L[i] = l
        diff = np.float32(np.float32(np.float32(scale * np.float32(l)) + mn) - x[i])
        diff = abs(diff) if use_mad else np.float32(diff * diff)
        best_error = np.float32(best_error + np.float32(w[i] * diff))
    if nstep < 1:
        return scale, np.float32(-mn)
    for step in range(nstep + 1):
        iscale = np.float32(np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step))) + fnmax)
                            / np.float32(mx - mn))
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = nearest_int(np.float32(iscale * np.float32(x[i] - mn)))
            l = max(0, min(nmax, l))
            Laux[i] = l
            fl = np.float32(l)
            wl = np.float32(w[i] * fl)
            sum_l = np.float32(sum_l + wl)
            sum_l2 = np.float32(sum_l2 + np.float32(wl * fl))
            sum_xl = np.float32(sum_xl + np.float32(wl * x[i]))
        D = np.float32(np.float32(sum_w * sum_l2) - np.float32(sum_l * sum_l))
        if D > 0:
            this_scale = np.float32(np.float32(np.float32(sum_w * sum_xl) - np.float32(sum_x * sum_l)) / D)
            this_min = np.float32(np.float32(np.float32(sum_l2 * sum_x) - np.float32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = np.float32(sum_xl / sum_l2)
            cur_error = F32(0.0)
            for i in range(n):
                diff = np.float32(np.float32(np.float32(this_scale * np.float32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur_error = np.float32(cur_error + np.float32(w[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, np.float32(-mn)


@njit(cache=True, error_model="numpy")
def _signed_max(x, n):
    """(value with the largest |x|, sign kept, first wins; that |x|)."""
    amax = F32(0.0)
    mx = F32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    return mx, amax


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L):
    """Symmetric search with weights x**2 (ggml's rmse_type 1, no imatrix); fills L (offset +nmax)."""
    mx, amax = _signed_max(x, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    fnmax = np.float32(nmax)
    iscale = np.float32(np.float32(-nmax) / mx)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[i]
        l = nearest_int(np.float32(iscale * xi))
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        fl = np.float32(l)
        w = np.float32(xi * xi)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    scale = np.float32(sumlx / suml2) if suml2 != 0 else F32(0.0)
    best = np.float32(scale * sumlx)
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = np.float32(np.float32(-np.float32(fnmax + np.float32(F32(0.1) * np.float32(k)))) / mx)
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            xi = x[i]
            l = nearest_int(np.float32(iscale * xi))
            fl = np.float32(max(-nmax, min(nmax - 1, l)))
            w = np.float32(xi * xi)
            sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
            suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
        if suml2 > 0 and np.float32(sumlx * sumlx) > np.float32(best * suml2):
            for i in range(n):
                l = nearest_int(np.float32(iscale * x[i]))
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = np.float32(sumlx / suml2)
            best = np.float32(scale * sumlx)
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L):
    """Symmetric levels -nmax..nmax-1 refined one element at a time (ggml's do_rmse path); L gets +nmax."""
    mx, amax = _signed_max(x, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    iscale = np.float32(np.float32(-nmax) / mx)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[i]
        l = nearest_int(np.float32(iscale * xi))
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l
        fl = np.float32(l)
        w = np.float32(xi * xi)
        sumlx = np.float32(sumlx + np.float32(np.float32(w * xi) * fl))
        suml2 = np.float32(suml2 + np.float32(np.float32(w * fl) * fl))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[i]
            w = np.float32(xi * xi)
            fli = np.float32(L[i])
            slx = np.float32(sumlx - np.float32(np.float32(w * xi) * fli))
            if slx > 0:
                sl2 = np.float32(suml2 - np.float32(np.float32(w * fli) * fli))
                new_l = nearest_int(np.float32(np.float32(xi * sl2) / slx))
                new_l = max(-nmax, min(nmax - 1, new_l))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx = np.float32(slx + np.float32(np.float32(w * xi) * fnl))
                    sl2 = np.float32(sl2 + np.float32(np.float32(w * fnl) * fnl))
                    if sl2 > 0 and np.float32(np.float32(slx * slx) * suml2) > np.float32(
                            np.float32(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return np.float32(sumlx / suml2) if suml2 > 0 else F32(0.0)


# ------------------------------------------------------------------------------------------------
# The same searches run on many groups at once ("lanes"): XT[i, g] is element i of group g, and every
# inner loop runs over g. Each lane still does exactly its own sequential float32 arithmetic, so the
# results are bit-identical to the scalar functions above, but the compiler can put 8-16 groups in one
# SIMD register instead of waiting on one long chain of dependent adds. Branches become selects.
# nearest_int is only trusted in range here; a lane that ever leaves it is flagged in `redo` and the
# caller recomputes that group with the scalar function (rare: flat groups, degenerate fits).


@njit(cache=True, error_model="numpy", inline="always")
def chunk_size(nb, target):
    """Split nb blocks into equal chunks of about `target` blocks, for lane kernels: a short tail chunk
    would have too few lanes (LLVM runs loops of fewer than ~24 iterations without SIMD)."""
    n_chunks = (nb + target - 1) // target
    return (nb + n_chunks - 1) // n_chunks


@njit(cache=True, error_model="numpy", inline="always")
def _nint_lane(v):
    """(nearest_int(v), in_range) without branches; the value is meaningless when not in range."""
    ok = abs(v) <= _IN_RANGE
    safe = v if ok else F32(0.0)
    # (safe + 1.5*2**23) - 1.5*2**23 is exact, so this is the rounded integer, as an int32
    return np.int32(np.float32(np.float32(safe + _MAGIC) - _MAGIC)), ok


@njit(cache=True, error_model="numpy")
def make_qkx2_lanes(XT, WT, nmax, rmin, rdelta, nstep, use_mad, LT, scale, the_min, redo):
    """make_qkx2_quants for every column g of XT/WT; LT gets the levels. Sets redo[g] where unsure."""
    n, G = XT.shape
    fnmax = np.float32(nmax)
    hi = np.int32(nmax)  # int32 clamps keep the vector loops 8/16 lanes wide
    mn = XT[0].copy()
    mx = XT[0].copy()
    sw = WT[0].copy()
    sx = np.empty(G, np.float32)
    for g in range(G):
        sx[g] = np.float32(sw[g] * XT[0, g])
        redo[g] = False
    for i in range(1, n):
        x = XT[i]
        w = WT[i]
        for g in range(G):
            xv = x[g]
            mn[g] = xv if xv < mn[g] else mn[g]
            mx[g] = xv if xv > mx[g] else mx[g]
            sw[g] = np.float32(sw[g] + w[g])
            sx[g] = np.float32(sx[g] + np.float32(w[g] * xv))
    iscale = np.empty(G, np.float32)
    best = np.zeros(G, np.float32)
    for g in range(G):
        m = F32(0.0) if mn[g] > 0 else mn[g]
        mn[g] = m
        redo[g] = mx[g] == m  # flat group: ggml returns early, the scalar path does the same
        iscale[g] = np.float32(fnmax / np.float32(mx[g] - m))
        scale[g] = np.float32(F32(1.0) / iscale[g])
    for i in range(n):
        x = XT[i]
        w = WT[i]
        Lr = LT[i]
        for g in range(G):
            l, ok = _nint_lane(np.float32(iscale[g] * np.float32(x[g] - mn[g])))
            redo[g] = redo[g] | (not ok)
            l = max(I0, min(hi, l))
            Lr[g] = l
            diff = np.float32(np.float32(np.float32(scale[g] * np.float32(l)) + mn[g]) - x[g])
            diff = abs(diff) if use_mad else np.float32(diff * diff)
            best[g] = np.float32(best[g] + np.float32(w[g] * diff))
    Laux = np.empty((n, G), np.int32)
    sl = np.empty(G, np.float32)
    sl2 = np.empty(G, np.float32)
    sxl = np.empty(G, np.float32)
    cur = np.empty(G, np.float32)
    t_scale = np.empty(G, np.float32)
    t_min = np.empty(G, np.float32)
    take = np.empty(G, np.bool_)
    took = np.zeros(G, np.bool_)
    took_is = np.zeros(G, np.float32)
    took_mn = np.zeros(G, np.float32)
    for step in range(nstep + 1):
        num = np.float32(np.float32(rmin + np.float32(rdelta * np.float32(step))) + fnmax)
        for g in range(G):
            iscale[g] = np.float32(num / np.float32(mx[g] - mn[g]))
            sl[g] = F32(0.0)
            sl2[g] = F32(0.0)
            sxl[g] = F32(0.0)
            cur[g] = F32(0.0)
        for i in range(n):
            x = XT[i]
            w = WT[i]
            La = Laux[i]
            for g in range(G):
                l, ok = _nint_lane(np.float32(iscale[g] * np.float32(x[g] - mn[g])))
                redo[g] = redo[g] | (not ok)
                l = max(I0, min(hi, l))
                La[g] = l
                fl = np.float32(l)
                wl = np.float32(w[g] * fl)
                sl[g] = np.float32(sl[g] + wl)
                sl2[g] = np.float32(sl2[g] + np.float32(wl * fl))
                sxl[g] = np.float32(sxl[g] + np.float32(wl * x[g]))
        for g in range(G):
            D = np.float32(np.float32(sw[g] * sl2[g]) - np.float32(sl[g] * sl[g]))
            ts = np.float32(np.float32(np.float32(sw[g] * sxl[g]) - np.float32(sx[g] * sl[g])) / D)
            tm = np.float32(np.float32(np.float32(sl2[g] * sx[g]) - np.float32(sl[g] * sxl[g])) / D)
            pos = tm > 0
            t_scale[g] = np.float32(sxl[g] / sl2[g]) if pos else ts
            t_min[g] = F32(0.0) if pos else tm
            take[g] = D > 0
        for i in range(n):
            x = XT[i]
            w = WT[i]
            La = Laux[i]
            for g in range(G):
                diff = np.float32(np.float32(np.float32(t_scale[g] * np.float32(La[g])) + t_min[g]) - x[g])
                diff = abs(diff) if use_mad else np.float32(diff * diff)
                cur[g] = np.float32(cur[g] + np.float32(w[g] * diff))
        for g in range(G):
            t = take[g] & (cur[g] < best[g])
            best[g] = cur[g] if t else best[g]
            scale[g] = t_scale[g] if t else scale[g]
            # remember what produced the accepted levels instead of copying them
            took[g] = took[g] | t
            took_is[g] = iscale[g] if t else took_is[g]
            took_mn[g] = mn[g] if t else took_mn[g]
            mn[g] = t_min[g] if t else mn[g]
    for i in range(n):
        x = XT[i]
        Lr = LT[i]
        for g in range(G):
            l, ok = _nint_lane(np.float32(took_is[g] * np.float32(x[g] - took_mn[g])))
            Lr[g] = max(I0, min(hi, l)) if took[g] else Lr[g]
    for g in range(G):
        the_min[g] = np.float32(-mn[g])


@njit(cache=True, error_model="numpy")
def _signed_max_lanes(XT):
    n, G = XT.shape
    amax = np.zeros(G, np.float32)
    mx = np.zeros(G, np.float32)
    for i in range(n):
        x = XT[i]
        for g in range(G):
            a = abs(x[g])
            t = a > amax[g]
            amax[g] = a if t else amax[g]
            mx[g] = x[g] if t else mx[g]
    return mx, amax


@njit(inline="always", cache=True, error_model="numpy")
def _qx_weighted_sums(XT, iscale, lo, hi, sumlx, suml2, redo):
    """Per column g: levels l = clamp(nint(iscale·x), lo, hi), w = x², sumlx = Σ(w·x)·l, suml2 = Σ(w·l)·l."""
    n, G = XT.shape
    for g in range(G):
        sumlx[g] = F32(0.0)
        suml2[g] = F32(0.0)
    for i in range(n):
        x = XT[i]
        for g in range(G):
            xi = x[g]
            l, ok = _nint_lane(np.float32(iscale[g] * xi))
            redo[g] = redo[g] | (not ok)
            fl = np.float32(max(lo, min(hi, l)))
            w = np.float32(xi * xi)
            sumlx[g] = np.float32(sumlx[g] + np.float32(np.float32(w * xi) * fl))
            suml2[g] = np.float32(suml2[g] + np.float32(np.float32(w * fl) * fl))


@njit(cache=True, error_model="numpy")
def make_qx_quants_lanes(XT, nmax, LT, scale, redo):
    """make_qx_quants (rmse_type 1) for every column of XT; LT gets levels + nmax."""
    n, G = XT.shape
    fnmax = np.float32(nmax)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    mx, amax = _signed_max_lanes(XT)
    best_is = np.empty(G, np.float32)
    sumlx = np.empty(G, np.float32)
    suml2 = np.empty(G, np.float32)
    best = np.empty(G, np.float32)
    for g in range(G):
        redo[g] = amax[g] < GROUP_MAX_EPS  # all-zero group: the scalar path's early return
        best_is[g] = np.float32(np.float32(-nmax) / mx[g])
    _qx_weighted_sums(XT, best_is, lo, hi, sumlx, suml2, redo)
    for g in range(G):
        s = np.float32(sumlx[g] / suml2[g]) if suml2[g] != 0 else F32(0.0)
        scale[g] = s
        best[g] = np.float32(s * sumlx[g])
    isc = np.empty(G, np.float32)
    for k in range(-9, 10):
        if k == 0:
            continue
        num = np.float32(-np.float32(fnmax + np.float32(F32(0.1) * np.float32(k))))
        for g in range(G):
            isc[g] = np.float32(num / mx[g])
        _qx_weighted_sums(XT, isc, lo, hi, sumlx, suml2, redo)
        for g in range(G):
            t = (suml2[g] > 0) & (np.float32(sumlx[g] * sumlx[g]) > np.float32(best[g] * suml2[g]))
            s = np.float32(sumlx[g] / suml2[g])
            scale[g] = s if t else scale[g]
            best[g] = np.float32(s * sumlx[g]) if t else best[g]
            best_is[g] = isc[g] if t else best_is[g]
    # the levels of the last accepted iscale (ggml recomputes them at each acceptance)
    for i in range(n):
        x = XT[i]
        Lr = LT[i]
        for g in range(G):
            l, ok = _nint_lane(np.float32(best_is[g] * x[g]))
            Lr[g] = nmax + max(lo, min(hi, l))


@njit(cache=True, error_model="numpy")
def make_q3_quants_lanes(XT, nmax, LT, scale, redo):
    """make_q3_quants (do_rmse) for every column of XT; LT (signed int) gets levels + nmax."""
    n, G = XT.shape
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    mx, amax = _signed_max_lanes(XT)
    isc = np.empty(G, np.float32)
    sumlx = np.zeros(G, np.float32)
    suml2 = np.zeros(G, np.float32)
    for g in range(G):
        redo[g] = amax[g] < GROUP_MAX_EPS
        isc[g] = np.float32(np.float32(-nmax) / mx[g])
    for i in range(n):
        x = XT[i]
        Lr = LT[i]
        for g in range(G):
            xi = x[g]
            l, ok = _nint_lane(np.float32(isc[g] * xi))
            redo[g] = redo[g] | (not ok)
            l = max(lo, min(hi, l))
            Lr[g] = l
            fl = np.float32(l)
            w = np.float32(xi * xi)
            sumlx[g] = np.float32(sumlx[g] + np.float32(np.float32(w * xi) * fl))
            suml2[g] = np.float32(suml2[g] + np.float32(np.float32(w * fl) * fl))
    # A pass that changes nothing leaves the state as it was, so lanes that ggml would have stopped
    # simply repeat a no-op pass: running all 5 passes on every lane is exact.
    changed = np.zeros(G, np.int32)
    for _ in range(5):
        for g in range(G):
            changed[g] = 0
        for i in range(n):
            x = XT[i]
            Lr = LT[i]
            for g in range(G):
                xi = x[g]
                w = np.float32(xi * xi)
                wx = np.float32(w * xi)
                Li = Lr[g]
                fli = np.float32(Li)
                slx = np.float32(sumlx[g] - np.float32(wx * fli))
                sl2 = np.float32(suml2[g] - np.float32(np.float32(w * fli) * fli))
                l, ok = _nint_lane(np.float32(np.float32(xi * sl2) / slx))
                live = slx > 0
                redo[g] = redo[g] | (live & (not ok))
                l = max(lo, min(hi, l))
                fnl = np.float32(l)
                slx2 = np.float32(slx + np.float32(wx * fnl))
                sl22 = np.float32(sl2 + np.float32(np.float32(w * fnl) * fnl))
                t = (live & (l != Li) & (sl22 > 0) & (np.float32(np.float32(slx2 * slx2) * suml2[g])
                                                      > np.float32(np.float32(sumlx[g] * sumlx[g]) * sl22)))
                Lr[g] = l if t else Li
                sumlx[g] = slx2 if t else sumlx[g]
                suml2[g] = sl22 if t else suml2[g]
                changed[g] += 1 if t else 0
        if changed.max() == 0:
            break
    for i in range(n):
        Lr = LT[i]
        for g in range(G):
            Lr[g] += nmax
    for g in range(G):
        scale[g] = np.float32(sumlx[g] / suml2[g]) if suml2[g] > 0 else F32(0.0)
