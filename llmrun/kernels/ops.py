"""Element-wise, norm, RoPE and attention kernels of the graph (float32 throughout, like the KV cache)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..runtime import limit_blas_threads
from .kv_formats import K_BLOCK, capacity, codes, k_block, k_f32, k_run, store_k, store_v, take, v_f32, v_rows
from .strict import exp, fma


# error_model="numpy": a zero or NaN divisor gives Inf/NaN (caught on the logits) instead of a ZeroDivisionError
@njit(fastmath=True, cache=True, error_model="numpy")
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w   (x, out: [T, n]; same formula as HF's LlamaRMSNorm)."""
    T, n = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + eps))
        for i in range(n):
            out[t, i] = x[t, i] * inv * w[i]


@njit(fastmath=True, cache=True)
def head_rmsnorm(x, col0, n_heads, w, eps):
    """In place, per token and head: the head_dim = len(w) columns of head h starting at col0 + h*head_dim
    become rmsnorm(...) * w (x [T, cols]: the fused QKV projection; the Q/K norms of qwen3 and gemma3)."""
    T = x.shape[0]
    n = w.shape[0]
    for t in range(T):
        for h in range(n_heads):
            c = col0 + h * n
            ss = np.float32(0.0)
            for i in range(n):
                ss += x[t, c + i] * x[t, c + i]
            inv = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + eps))
            for i in range(n):
                x[t, c + i] = x[t, c + i] * inv * w[i]


@njit(inline="always")
def _rope_head(qkv, t, base, cos, sin, dst, neox):
    """dst[:] = the head at columns base.. of token t of qkv, rotated with cos/sin row t. Explicit FMAs
    (strict.py): every kernel this is inlined into, fast-math or not, rounds it alike (batch invariance)."""
    half = cos.shape[1]
    step, span = (1, half) if neox else (2, 1)   # pair i: elements i*step and i*step + span
    for i in range(half):
        a = qkv[t, base + i * step]
        b = qkv[t, base + i * step + span]
        c, s = cos[t, i], sin[t, i]
        dst[i * step] = fma(a, c, -(b * s))
        dst[i * step + span] = fma(a, s, b * c)
    for i in range(2 * half, dst.shape[0]):
        dst[i] = qkv[t, base + i]


@njit(inline="always")
def _store_group(qkv, t, cos, sin, k_cache, v_cache, p, g, n_head, n_head_kv, k_dim, v_dim, neox, krow):
    """K/V group g of token t: its K rotated, both written to slot p of the caches."""
    k0 = n_head * k_dim
    v0 = k0 + n_head_kv * k_dim
    _rope_head(qkv, t, k0 + g * k_dim, cos, sin, krow, neox)
    store_k(k_cache, g, p, krow)
    store_v(v_cache, g, p, qkv[t, v0 + g * v_dim:v0 + (g + 1) * v_dim])


@njit(fastmath=True, cache=True)
def rope_store(qkv, cos, sin, q_out, k_cache, v_cache, pos0, n_head, n_head_kv, k_dim, v_dim, neox=False):
    """Split the fused QKV projection, rotate Q and K, write K and V to one layer's cache.

    qkv [T, n_head*k_dim + n_head_kv*(k_dim + v_dim)]; cos/sin [T, n_rot/2] (attention scale factors
    already folded in); q_out [T, n_head, k_dim]; k_cache and v_cache one layer's caches (kv_formats.py: K
    transposed in blocks of positions, V [n_head_kv, capacity, v_dim]), each of a kv_formats.py type;
    position p goes to slot p % capacity (kv_cache.py).
    Rotated pairs: ggml's NORM mode (2i, 2i+1) on the permuted GGUF Q/K rows, or NEOX mode (i, i + n_rot/2);
    dimensions from n_rot on pass unrotated."""
    cap = capacity(v_cache)
    krow = np.empty(k_dim, np.float32)
    for t in range(qkv.shape[0]):
        for h in range(n_head):
            _rope_head(qkv, t, h * k_dim, cos, sin, q_out[t, h], neox)
        for g in range(n_head_kv):
            _store_group(qkv, t, cos, sin, k_cache, v_cache, (pos0 + t) % cap, g, n_head, n_head_kv, k_dim, v_dim,
                         neox, krow)


# Attention: ONE body for every query (decode, prefill, the server's batched decode), whose arithmetic depends
# only on that query, not on how many run beside it: a score is an FMA chain over the head's dimensions, the
# softmax sum adds in a fixed lane order, the output is an FMA chain over positions (kernels/strict.py; strict
# float semantics, no fast-math, so no kernel reorders them). So prefill gives decode's bits. Queries run in
# tiles of consecutive positions: each block of K/V positions is widened to float32 once for the tile's
# ATTN_PAIRS (query, head) pairs, which then read it from L1.
ATTN_PAIRS = 32    # (query, head) pairs per tile
ATTN_BLOCK = K_BLOCK   # positions per widened block: one K block of the cache (64 dims: 16 KiB as float32)
LANES = 16         # the softmax sum's partial sums (one vector register)


@njit(inline="always")
def _widen_k(k_cache, cap, g, p, n, kb):
    """K of group g at positions p..p+n-1 (slots modulo the capacity cap: a ring wraps at most once) -> kb[:, :n];
    a block of the cache in one pass when the positions start one (always, but in a sliding window's ring)."""
    first = p % cap
    blk = codes(k_cache).shape[-1]
    if first % blk == 0 and first + n <= cap and blk == kb.shape[1]:
        k_block(k_cache, g, first // blk, kb)
        return
    n1 = min(n, cap - first)
    for i in range(kb.shape[0]):
        k_run(k_cache, g, i, first, n1, kb[i, :n1])
        if n1 < n:
            k_run(k_cache, g, i, 0, n - n1, kb[i, n1:n])


@njit(inline="always")
def _scores(out, kb, a, qv):
    """out[s] = sum_i qv[i] * kb[i, a + s] as an FMA chain over i (from 0)."""
    m = out.shape[0]
    out[:] = 0
    k_dim = qv.shape[0]
    i = 0
    while i + 4 <= k_dim:   # four dimensions per pass over out (a quarter of its loads and stores)
        k0, k1, k2, k3 = kb[i, a:a + m], kb[i + 1, a:a + m], kb[i + 2, a:a + m], kb[i + 3, a:a + m]
        q0, q1, q2, q3 = qv[i], qv[i + 1], qv[i + 2], qv[i + 3]
        for s in range(m):
            out[s] = fma(q3, k3[s], fma(q2, k2[s], fma(q1, k1[s], fma(q0, k0[s], out[s]))))
        i += 4
    while i < k_dim:
        k0, q0 = kb[i, a:a + m], qv[i]
        for s in range(m):
            out[s] = fma(q0, k0[s], out[s])
        i += 1


@njit(inline="always")
def _softmax(row, softcap):
    """row <- exp(row - max) in place (soft-capped first if softcap > 0); returns the sum, added in LANES partial
    sums by position (counted from the row's start) and those in a fixed tree."""
    m = row.shape[0]
    if softcap > 0:
        for s in range(m):
            row[s] = softcap * np.float32(math.tanh(row[s] / softcap))
    part = np.empty(LANES, np.float32)
    full = m - m % LANES
    part[:] = row[0]
    for s0 in range(0, full, LANES):
        for j in range(LANES):
            part[j] = max(part[j], row[s0 + j])
    for j in range(m - full):
        part[j] = max(part[j], row[full + j])
    mx = part[0]
    for j in range(1, LANES):
        mx = max(mx, part[j])
    for s in range(m):
        row[s] = exp(row[s] - mx)
    part[:] = 0
    for s0 in range(0, full, LANES):
        for j in range(LANES):
            part[j] += row[s0 + j]
    for j in range(m - full):
        part[j] += row[full + j]
    w = LANES // 2
    while w:
        for j in range(w):
            part[j] += part[j + w]
        w //= 2
    return part[0]


@njit(inline="always")
def _weighted_add(o, p, vb, a):
    """o[i] += sum_s p[s] * vb[a + s, i] as an FMA chain over s."""
    m = p.shape[0]
    s = 0
    while s + 4 <= m:   # four positions per pass over o
        v0, v1, v2, v3 = vb[a + s], vb[a + s + 1], vb[a + s + 2], vb[a + s + 3]
        p0, p1, p2, p3 = p[s], p[s + 1], p[s + 2], p[s + 3]
        for i in range(o.shape[0]):
            o[i] = fma(p3, v3[i], fma(p2, v2[i], fma(p1, v1[i], fma(p0, v0[i], o[i]))))
        s += 4
    while s < m:
        v0, p0 = vb[a + s], p[s]
        for i in range(o.shape[0]):
            o[i] = fma(p0, v0[i], o[i])
        s += 1


@njit(inline="always", error_model="numpy")
def _attend(q, t0, nq, g, k_cache, v_cache, p0, window, softcap, scale, out, row0):
    """Queries t0..t0+nq-1 of q (consecutive positions from p0) and K/V group g -> out[row0..row0+nq-1]: the
    body of attention() and attention_slots(); each query's result is the same whatever nq is."""
    n_head, k_dim = q.shape[1], q.shape[2]
    n_head_kv = codes(k_cache).shape[0]
    cap = capacity(v_cache)
    v_dim = codes(v_cache).shape[2]
    group = n_head // n_head_kv
    h0 = g * group
    lo = max(0, p0 - window + 1) if window > 0 else 0   # the first position any query of the tile sees
    n = p0 + nq - lo
    npair = nq * group
    qs = np.empty((npair, k_dim), np.float32)
    first = np.empty(npair, np.int64)   # pair k sees positions lo + first[k] .. lo + end[k] - 1
    end = np.empty(npair, np.int64)
    for j in range(nq):
        pj = p0 + j
        for hh in range(group):
            k = j * group + hh
            first[k] = (max(0, pj - window + 1) if window > 0 else 0) - lo
            end[k] = pj - lo + 1
            for i in range(k_dim):
                qs[k, i] = q[t0 + j, h0 + hh, i] * scale
    sc = np.empty((npair, n), np.float32)
    kb = np.empty((k_dim, ATTN_BLOCK), np.float32)
    for b0 in range(0, n, ATTN_BLOCK):
        bw = min(ATTN_BLOCK, n - b0)
        _widen_k(k_cache, cap, g, lo + b0, bw, kb)
        for k in range(npair):
            sa, sb = max(first[k], b0), min(end[k], b0 + bw)
            if sa < sb:
                _scores(sc[k, sa:sb], kb, sa - b0, qs[k])
    totals = np.empty(npair, np.float32)
    for k in range(npair):
        totals[k] = _softmax(sc[k, first[k]:end[k]], softcap)
    o = np.zeros((npair, v_dim), np.float32)
    vb = np.empty((min(n, ATTN_BLOCK), v_dim), np.float32)
    for b0 in range(0, n, ATTN_BLOCK):
        bw = min(ATTN_BLOCK, n - b0)
        slot = (lo + b0) % cap           # a ring wraps at most once (n <= capacity)
        n1 = min(bw, cap - slot)
        v_rows(v_cache, g, slot, n1, vb)
        if n1 < bw:
            v_rows(v_cache, g, 0, bw - n1, vb[n1:])
        for k in range(npair):
            sa, sb = max(first[k], b0), min(end[k], b0 + bw)
            if sa < sb:
                _weighted_add(o[k], sc[k, sa:sb], vb, sa - b0)
    for j in range(nq):
        for hh in range(group):
            k = j * group + hh
            inv = np.float32(1.0) / totals[k]
            for i in range(v_dim):
                out[row0 + j, (h0 + hh) * v_dim + i] = o[k, i] * inv


@njit(parallel=True, cache=True, error_model="numpy")
def attention(q, k_cache, v_cache, pos0, scale, out, window=0, softcap=0.0):
    """Causal softmax attention with grouped K/V heads.

    q [T, n_head, k_dim] for positions pos0..; k_cache [n_head_kv, ceil(capacity / KB), k_dim, KB] and v_cache
    [n_head_kv, capacity, v_dim] holding the positions the queries see, position p in slot p % capacity
    (kv_cache.py, kv_formats.py); out [T, n_head*v_dim]. window > 0: query p sees positions p-window+1 .. p only
    (sliding-window attention). softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2).
    K is stored transposed (in blocks of positions) so that the scores of all positions build up as contiguous multiply-adds
    (vectorized over positions, no per-position horizontal sum). The heads of a K/V group and a tile of
    queries run together (_attend), so each cached K/V row is widened once for all of them. A job is a pair
    of tiles (j, last - j): under the causal mask late tiles see more positions than early ones."""
    T, n_head = q.shape[0], q.shape[1]
    n_head_kv = codes(k_cache).shape[0]
    nq = max(1, min(T, ATTN_PAIRS // (n_head // n_head_kv)))
    n_tiles = -(-T // nq)
    for job in prange(((n_tiles + 1) // 2) * n_head_kv):
        g = job % n_head_kv
        j = job // n_head_kv
        last = n_tiles - 1 - j
        for tile in range(j, last + 1, max(1, last - j)):   # j and last, once if they are the same
            t0 = tile * nq
            _attend(q, t0, min(nq, T - t0), g, k_cache, v_cache, pos0 + t0, window, softcap, scale, out, t0)


@njit(parallel=True, cache=True, error_model="numpy")
def attention_slots(qkv, cos, sin, k_pool, v_pool, slots, pos, n_head, k_dim, v_dim, neox, scale, out, window=0,
                    softcap=0.0):
    """rope_store and attention() for one new token of each of several sequences, in one launch: row b of qkv
    (rope_store's layout) / cos / sin is the token at position pos[b] of the caches k_pool[slots[b]] /
    v_pool[slots[b]] ([n_slots, ...] pools of attention()'s cache layout); out [B, n_head*v_dim]. A job is one
    (token, K/V group): it rotates that group's Q heads, writes its K and V, and attends, so the cache writes
    run in parallel too. Each row equals rope_store + attention() of that sequence alone, bit for bit."""
    B = qkv.shape[0]
    n_head_kv = codes(k_pool).shape[1]
    group = n_head // n_head_kv
    for job in prange(B * n_head_kv):
        b = job // n_head_kv
        g = job % n_head_kv
        k, v = take(k_pool, slots[b]), take(v_pool, slots[b])
        q = np.empty((1, n_head, k_dim), np.float32)   # only group g's heads are written (and read by _attend)
        for hh in range(group):
            h = g * group + hh
            _rope_head(qkv, b, h * k_dim, cos, sin, q[0, h], neox)
        krow = np.empty(k_dim, np.float32)
        _store_group(qkv, b, cos, sin, k, v, pos[b] % capacity(v), g, n_head, n_head_kv, k_dim, v_dim, neox, krow)
        _attend(q, 0, 1, g, k, v, pos[b], window, softcap, scale, out, b)


# Fast math assumes no infinity: an exp that overflowed (silu of g < -88, or Gemma's pre-norm activations of
# -10 and below in gelu) came out of the vectorized loops as NaN. Its argument is therefore kept where exp is
# finite (1 + exp(88) = 1.7e38: g / that is a tiny number instead of -0), and gelu's cube where it is finite
# (beyond |g| = 20 gelu_tanh(g) is g or 0 in float32 either way).
EXP_ARG_MAX = np.float32(88.0)
GELU_LINEAR = 20.0


@njit(fastmath=True, cache=True, error_model="numpy")
def swiglu(gate_up, n_ff, out):
    """out = silu(gate) * up, where gate_up [T, 2*n_ff] holds gate then up for each token. strict.exp: libm's
    expf, called one element at a time, made this 4x slower than the vectorized polynomial."""
    T = gate_up.shape[0]
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + exp(min(-g, EXP_ARG_MAX))) * gate_up[t, n_ff + i]


@njit(fastmath=True, cache=True, error_model="numpy")
def geglu(gate_up, n_ff, out):
    """out = gelu_tanh(gate) * up (Gemma's GELU, tanh approximation, as HF's gelu_pytorch_tanh), gate_up as swiglu.
    0.5 x (1 + tanh(u)) = x * sigmoid(2u): one exp per element, which vectorizes (tanh does not). error_model
    "numpy" as swiglu's: Python's division check kept the loop scalar (6.6 ns an element, 12x swiglu's)."""
    T = gate_up.shape[0]
    c = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            gc = min(max(g, np.float32(-GELU_LINEAR)), np.float32(GELU_LINEAR))   # the cube stays finite
            e = exp(min(c * (gc + np.float32(0.044715) * gc * gc * gc), EXP_ARG_MAX))
            out[t, i] = g / (np.float32(1.0) + e) * gate_up[t, n_ff + i]


QUERY_CHUNK = 256   # prefill attention: queries per score matrix (bounds its memory)


def attention_blas(q, k_cache, v_cache, pos0, scale, out, window=0, softcap=0.0):
    """attention() through two BLAS products per K/V group and chunk of queries (same inputs and layouts,
    float32-close to attention() but not bit-equal). The engine no longer runs it: prefill uses attention(),
    which gives decode's bits (docs/kernels.md, "Batch invariance"); kept as an independent float path."""
    limit_blas_threads()   # BLAS's own worker threads would fight numba's (runtime.py)
    T, n_head, k_dim = q.shape
    n_head_kv = codes(k_cache).shape[0]
    cap = capacity(v_cache)
    v_dim = codes(v_cache).shape[2]
    group = n_head // n_head_kv
    for c0 in range(0, T, QUERY_CHUNK):
        c1 = min(T, c0 + QUERY_CHUNK)
        C = c1 - c0
        qpos = pos0 + np.arange(c0, c1)
        lo = max(0, pos0 + c0 - window + 1) if window > 0 else 0   # first position the chunk sees
        n = pos0 + c1 - lo
        kpos = np.arange(lo, lo + n)
        # causal mask (and the window): query at position qp sees keys lo.. qp (and > qp - window)
        masked = kpos[None, :] > qpos[:, None]
        if window > 0:
            masked |= kpos[None, :] <= qpos[:, None] - window
        first = lo % cap
        slots = slice(first, first + n) if first + n <= cap else kpos % cap   # contiguous unless wrapped
        for g in range(n_head_kv):
            qg = q[c0:c1, g * group:(g + 1) * group].transpose(1, 0, 2).reshape(group * C, k_dim) * scale
            s = (qg @ k_f32(k_cache, g, slots)).reshape(group, C, n)
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            s[:, masked] = -np.inf
            s -= s.max(axis=2, keepdims=True)
            np.exp(s, out=s)
            total = s.sum(axis=2, keepdims=True)
            o = (s.reshape(group * C, n) @ v_f32(v_cache, g, slots)).reshape(group, C, v_dim) / total
            out[c0:c1].reshape(C, n_head, v_dim)[:, g * group:(g + 1) * group] = o.transpose(1, 0, 2)
