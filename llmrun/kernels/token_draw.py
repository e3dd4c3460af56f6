"""One sampled token from one row of logits, in one call: text/sampling.py's chain (top-k -> top-p -> min-p ->
temperature -> draw) without its ~20 numpy calls.

A server samples every stream's token between two forwards, on the thread that runs them, while the other
threads of the parallel kernels wait. In numpy the chain cost ~80 us a row on a quiet process and ~400 us in
the server: each call on a large array releases the GIL, and the HTTP threads waiting for it ran then. Here
it is one call that holds the GIL.

The arithmetic is the numpy chain's, step for step, so that the same uniform number picks the same token:
the same candidates (the k largest, ties to the lower id), the same float64 softmax (numpy's pairwise sum,
then a running cumulative sum), the same comparisons. A row holding a NaN returns -1 (an error for the caller:
no step orders NaNs). tests/test_sampling.py checks token for token against the chain of text/sampling.py's
functions.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

BOUND_SETS = 64   # at least this many disjoint sets bound the k-th largest (text/sampling.py's top_k too)
_PAIRWISE_BLOCK = 128   # numpy's PW_BLOCKSIZE


@njit(cache=True)
def draw_token(logits, top_k, top_p, min_p, temperature, u):
    """The token sampling.Sampler.sample would draw from the float32 row `logits` (penalties already applied,
    temperature > 0) with `u` = its generator's next random() number; -1 if the row holds a NaN."""
    n = logits.shape[0]
    nan = False
    for i in range(n):   # (no early exit: the loop vectorizes)
        nan |= logits[i] != logits[i]
    if nan:
        return -1
    if 0 < top_k < n:
        ids = _top_k_ids(logits, top_k)
    else:
        ids = np.argsort(-logits, kind="mergesort")   # all of them, most likely first, ties to the lower id
    row = logits[ids]
    keep = row.shape[0]
    if top_p < 1.0:
        probs = _softmax(row.astype(np.float64))
        total = 0.0
        below = 0                       # searchsorted(cumsum, top_p, "left"): how many sums stay below top_p
        for i in range(keep):
            total += probs[i]
            if total < top_p:
                below += 1
        keep = max(1, min(below + 1, keep))
    if min_p > 0.0 and keep > 0:
        bar = np.float64(row[0]) + math.log(min_p)   # row[0] is the largest kept logit
        m = 0
        for i in range(keep):
            if np.float64(row[i]) >= bar:
                m += 1
        keep = max(1, m)                # the kept logits are in descending order: the passing ones are a prefix
    scaled = np.empty(keep, np.float64)
    t = np.float32(temperature)
    for i in range(keep):
        scaled[i] = np.float64(row[i] / t)   # float32 division, as numpy divides a float32 row
    probs = _softmax(scaled)
    cum = np.empty(keep, np.float64)
    total = 0.0
    for i in range(keep):
        total += probs[i]
        cum[i] = total
    target = u * cum[keep - 1]
    i = 0
    while i < keep and cum[i] <= target:   # searchsorted(cum, target, "right")
        i += 1
    return ids[min(i, keep - 1)]


@njit(inline="always")
def _top_k_ids(logits, k):
    """sampling._top_k_order for 0 < k < len(logits), no NaN: the k largest logits' ids, most likely first, ties to
    the lower id. Candidates: the logits at or above a bound on the k-th largest (any bound gives the same
    result; a good one leaves few), cut to the k-th largest value when many, then a stable sort.

    The bound: the smallest of the maxima of C >= k disjoint sets (each maximum is a different element), the
    sets strided (ids j, j + C, ...) so that a vocabulary's runs of related ids do not all land in one (~200-300
    candidates of SmolLM2's 49152 at k = 40). C is a multiple of 64: the maxima are updated 64 at a time
    (_max64), which also gives each run of 64 ids its largest logit, so that only the runs reaching the bound
    are searched for candidates."""
    n = logits.shape[0]
    sets = -(-max(k, BOUND_SETS) // 64) * 64
    size = n // sets
    if size < 8:   # a small vocabulary: the k-th largest itself bounds, every id is looked at
        bound = np.partition(logits, n - k)[n - k]
        runs = 0
    else:
        maxima = np.full(sets, -np.inf, np.float32)
        runs = size * sets // 64
        for q in range(runs):
            _max64(maxima, (q * 64) % sets, logits, q * 64)
        bound = maxima.min()
    reaches = np.empty(runs, np.bool_)
    room = n - runs * 64
    for q in range(runs):
        reaches[q] = _any_at_least(logits, q * 64, bound)
        room += 64 * reaches[q]
    cand = np.empty(room, np.int64)
    c = 0
    for q in range(runs):
        if reaches[q]:
            for i in range(q * 64, q * 64 + 64):
                if logits[i] >= bound:
                    cand[c] = i
                    c += 1
    for i in range(runs * 64, n):
        if logits[i] >= bound:
            cand[c] = i
            c += 1
    cand = cand[:c]
    if c > 4 * k:
        vals = logits[cand]
        kth = np.partition(vals, c - k)[c - k]
        cand = cand[vals >= kth]
    order = np.argsort(-logits[cand], kind="mergesort")
    return cand[order[:k]]


def _f32_rows(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.dtype == types.float32 for a in arrays)


_V64 = ir.VectorType(ir.FloatType(), 64)


def _run_ptr(context, builder, ty, arr, start):
    """A <64 x float> pointer to element `start` of a float32 array."""
    p = builder.gep(context.make_array(ty)(context, builder, arr).data, [start])
    return builder.bitcast(p, _V64.as_pointer())


@intrinsic
def _max64(typingctx, acc, a0, src, s0):
    """acc[a0:a0+64] = max(acc[a0:a0+64], src[s0:s0+64]) as one <64 x float> operation (NaN-free rows): numba's
    loop of it did not vectorize (it could not tell the two arrays apart) and was ~8x slower."""
    if not _f32_rows(acc, src):
        return None   # float32 rows only (the vector type)
    sig = types.void(acc, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):
        ap = _run_ptr(context, builder, signature.args[0], args[0], args[1])
        sp = _run_ptr(context, builder, signature.args[2], args[2], args[3])
        a, b = builder.load(ap, align=4), builder.load(sp, align=4)
        builder.store(builder.select(builder.fcmp_ordered(">", b, a), b, a), ap, align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _any_at_least(typingctx, src, s0, bound):
    """Whether any of src[s0:s0+64] is >= bound (float32), in vector compares."""
    if not _f32_rows(src) or bound != types.float32:
        return None
    sig = types.boolean(src, types.intp, bound)

    def codegen(context, builder, signature, args):
        v = builder.load(_run_ptr(context, builder, signature.args[0], args[0], args[1]), align=4)
        b = builder.insert_element(ir.Constant(_V64, ir.Undefined), args[2], ir.Constant(ir.IntType(32), 0))
        b = builder.shuffle_vector(b, b, ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64))
        mask = builder.fcmp_ordered(">=", v, b)
        bits = builder.bitcast(mask, ir.IntType(64))
        return builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(64), 0))
    return sig, codegen


@njit(inline="always")
def _softmax(z):
    """sampling._softmax of a float64 row: exp(z - max), divided by its sum (added as numpy adds it)."""
    p = np.exp(z - z.max())
    return p / _pairwise_sum(p, 0, p.shape[0])


@njit(inline="always")
def _pairwise_sum(a, start, n):
    """numpy's pairwise summation of a[start:start + n] (float64): blocks of up to 128 summed by _block_sum, a
    longer run split into halves (the first a multiple of 8) whose sums are added. Iterative, with a stack (a
    recursive function broke numba's on-disk cache)."""
    if n <= _PAIRWISE_BLOCK:
        return _block_sum(a, start, n)
    depth = 3 * 64
    todo_start, todo_n, todo_join = np.empty(depth, np.int64), np.empty(depth, np.int64), np.empty(depth, np.bool_)
    sums = np.empty(depth, np.float64)
    top, done = 0, 0
    todo_start[0], todo_n[0], todo_join[0] = start, n, False
    top = 1
    while top:
        top -= 1
        s0, m, join = todo_start[top], todo_n[top], todo_join[top]
        if join:                      # both halves summed: left + right
            done -= 1
            sums[done - 1] = sums[done - 1] + sums[done]
        elif m <= _PAIRWISE_BLOCK:
            sums[done] = _block_sum(a, s0, m)
            done += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            todo_start[top], todo_n[top], todo_join[top] = s0, m, True            # after both halves
            todo_start[top + 1], todo_n[top + 1], todo_join[top + 1] = s0 + m2, m - m2, False
            todo_start[top + 2], todo_n[top + 2], todo_join[top + 2] = s0, m2, False  # the left half first
            top += 3
    return sums[0]


@njit(inline="always")
def _block_sum(a, start, n):
    """numpy's pairwise_sum for n <= 128: below 8 elements a running sum, else eight running sums combined in a
    fixed tree, then the rest added one by one."""
    if n < 8:
        s = 0.0
        for i in range(start, start + n):
            s += a[i]
        return s
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:
        j = start + i
        r0 += a[j]
        r1 += a[j + 1]
        r2 += a[j + 2]
        r3 += a[j + 3]
        r4 += a[j + 4]
        r5 += a[j + 5]
        r6 += a[j + 6]
        r7 += a[j + 7]
        i += 8
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        s += a[start + i]
        i += 1
    return s
