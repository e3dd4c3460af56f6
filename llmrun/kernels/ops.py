"""Element-wise and attention kernels of the LLaMA graph (float32 throughout, like the KV cache)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..runtime import limit_blas_threads


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
def rope_store(qkv, cos, sin, q_out, k_cache, v_cache, pos0, n_head, n_head_kv, k_dim, v_dim):
    """Split the fused QKV projection, rotate Q and K, append K and V to one layer's cache.

    qkv [T, n_head*k_dim + n_head_kv*(k_dim + v_dim)]; cos/sin [T, n_rot/2] (attention scale factors
    already folded in); q_out [T, n_head, k_dim]; k_cache [n_head_kv, k_dim, n_ctx] (transposed, see
    attention); v_cache [n_head_kv, n_ctx, v_dim].
    ggml's NORM rope mode: adjacent pairs (2i, 2i+1) of the permuted GGUF Q/K rows."""
    T = qkv.shape[0]
    half = cos.shape[1]
    k0 = n_head * k_dim
    v0 = k0 + n_head_kv * k_dim
    for t in range(T):
        for h in range(n_head):
            base = h * k_dim
            for i in range(half):
                a = qkv[t, base + 2 * i]
                b = qkv[t, base + 2 * i + 1]
                q_out[t, h, 2 * i] = a * cos[t, i] - b * sin[t, i]
                q_out[t, h, 2 * i + 1] = a * sin[t, i] + b * cos[t, i]
            for i in range(2 * half, k_dim):
                q_out[t, h, i] = qkv[t, base + i]
        p = pos0 + t
        for g in range(n_head_kv):
            base = k0 + g * k_dim
            for i in range(half):
                a = qkv[t, base + 2 * i]
                b = qkv[t, base + 2 * i + 1]
                k_cache[g, 2 * i, p] = a * cos[t, i] - b * sin[t, i]
                k_cache[g, 2 * i + 1, p] = a * sin[t, i] + b * cos[t, i]
            for i in range(2 * half, k_dim):
                k_cache[g, i, p] = qkv[t, base + i]
            for i in range(v_dim):
                v_cache[g, p, i] = qkv[t, v0 + g * v_dim + i]


@njit(inline="always", fastmath=True, cache=True, error_model="numpy")
def _attend(q, t, g, k_cache, v_cache, n, scale, out, row):
    """One query token t and one K/V group g over the first n cached positions -> out[row] (attention's body,
    shared with attention_slots so both give the same bits)."""
    n_head, k_dim = q.shape[1], q.shape[2]
    n_head_kv = k_cache.shape[0]
    v_dim = v_cache.shape[2]
    group = n_head // n_head_kv
    h0 = g * group
    scores = np.zeros((group, n), np.float32)
    i = 0
    while i + 4 <= k_dim:   # four K rows per pass: a quarter of the loads/stores of `scores`
        k0 = k_cache[g, i]
        k1 = k_cache[g, i + 1]
        k2 = k_cache[g, i + 2]
        k3 = k_cache[g, i + 3]
        for hh in range(group):
            q0 = q[t, h0 + hh, i] * scale
            q1 = q[t, h0 + hh, i + 1] * scale
            q2 = q[t, h0 + hh, i + 2] * scale
            q3 = q[t, h0 + hh, i + 3] * scale
            sc = scores[hh]
            for s in range(n):
                sc[s] += q0 * k0[s] + q1 * k1[s] + q2 * k2[s] + q3 * k3[s]
        i += 4
    while i < k_dim:
        krow = k_cache[g, i]
        for hh in range(group):
            qi = q[t, h0 + hh, i] * scale
            sc = scores[hh]
            for s in range(n):
                sc[s] += qi * krow[s]
        i += 1
    totals = np.empty(group, np.float32)
    for hh in range(group):
        sc = scores[hh]
        mx = sc[0]
        for s in range(1, n):
            mx = max(mx, sc[s])
        total = np.float32(0.0)
        for s in range(n):
            e = np.float32(math.exp(sc[s] - mx))
            sc[s] = e
            total += e
        totals[hh] = total
    o = np.zeros((group, v_dim), np.float32)
    s = 0
    while s + 4 <= n:
        v0 = v_cache[g, s]
        v1 = v_cache[g, s + 1]
        v2 = v_cache[g, s + 2]
        v3 = v_cache[g, s + 3]
        for hh in range(group):
            p0 = scores[hh, s]
            p1 = scores[hh, s + 1]
            p2 = scores[hh, s + 2]
            p3 = scores[hh, s + 3]
            oh = o[hh]
            for i in range(v_dim):
                oh[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i]
        s += 4
    while s < n:
        vrow = v_cache[g, s]
        for hh in range(group):
            p = scores[hh, s]
            oh = o[hh]
            for i in range(v_dim):
                oh[i] += p * vrow[i]
        s += 1
    for hh in range(group):
        inv = np.float32(1.0) / totals[hh]
        for i in range(v_dim):
            out[row, (h0 + hh) * v_dim + i] = o[hh, i] * inv


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def attention(q, k_cache, v_cache, pos0, scale, out):
    """Causal softmax attention with grouped K/V heads.

    q [T, n_head, k_dim] for positions pos0..; k_cache [n_head_kv, k_dim, n_ctx] and v_cache
    [n_head_kv, n_ctx, v_dim] holding positions 0..pos0+T-1; out [T, n_head*v_dim].
    K is stored transposed so that the scores of all positions build up as contiguous multiply-adds
    (vectorized over positions, no per-position horizontal sum). The heads sharing a K/V group are
    handled together, so each cached K/V row is fetched once (from L1 for the group's other heads)."""
    T = q.shape[0]
    n_head_kv = k_cache.shape[0]
    for job in prange(T * n_head_kv):
        t = job // n_head_kv
        _attend(q, t, job % n_head_kv, k_cache, v_cache, pos0 + t + 1, scale, out, t)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def attention_slots(q, k_pool, v_pool, slots, pos, scale, out):
    """attention() for one new token of each of several sequences, in one launch: q [B, n_head, k_dim], token
    b at position pos[b] of the caches k_pool[slots[b]] / v_pool[slots[b]] ([n_slots, ...] pools of
    attention()'s cache layout); out [B, n_head*v_dim]. Each row equals attention() of that sequence alone."""
    B = q.shape[0]
    n_head_kv = k_pool.shape[1]
    for job in prange(B * n_head_kv):
        b = job // n_head_kv
        k = slots[b]
        _attend(q[b:b + 1], 0, job % n_head_kv, k_pool[k], v_pool[k], pos[b] + 1, scale, out, b)


@njit(fastmath=True, cache=True, error_model="numpy")
def swiglu(gate_up, n_ff, out):
    """out = silu(gate) * up, where gate_up [T, 2*n_ff] holds gate then up for each token."""
    T = gate_up.shape[0]
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[t, n_ff + i]


QUERY_CHUNK = 256   # prefill attention: queries per score matrix (bounds its memory)


def attention_blas(q, k_cache, v_cache, pos0, scale, out):
    """attention() for many queries at once: per K/V group, scores and the weighted sum of V are two
    BLAS products over a chunk of queries (same inputs, layouts and result; ~5x faster for long prompts)."""
    limit_blas_threads()   # BLAS's own worker threads would fight numba's (runtime.py)
    T, n_head, k_dim = q.shape
    n_head_kv = k_cache.shape[0]
    v_dim = v_cache.shape[2]
    group = n_head // n_head_kv
    for c0 in range(0, T, QUERY_CHUNK):
        c1 = min(T, c0 + QUERY_CHUNK)
        C = c1 - c0
        n = pos0 + c1   # keys visible to the last query of the chunk
        # causal mask: query t (absolute position pos0 + t) sees keys 0..pos0 + t
        masked = np.arange(n)[None, :] > (pos0 + np.arange(c0, c1))[:, None]
        for g in range(n_head_kv):
            qg = q[c0:c1, g * group:(g + 1) * group].transpose(1, 0, 2).reshape(group * C, k_dim) * scale
            s = (qg @ k_cache[g, :, :n]).reshape(group, C, n)
            s[:, masked] = -np.inf
            s -= s.max(axis=2, keepdims=True)
            np.exp(s, out=s)
            total = s.sum(axis=2, keepdims=True)
            o = (s.reshape(group * C, n) @ v_cache[g, :n]).reshape(group, C, v_dim) / total
            out[c0:c1].reshape(C, n_head, v_dim)[:, g * group:(g + 1) * group] = o.transpose(1, 0, 2)
