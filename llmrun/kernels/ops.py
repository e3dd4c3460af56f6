"""Element-wise, norm, RoPE and attention kernels of the graph (float32 throughout, like the KV cache)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..runtime import limit_blas_threads
from .kv_formats import codes, k_f32, k_run, scratch, store_k, store_v, take, v_f32, v_row


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


@njit(fastmath=True, cache=True)
def rope_store(qkv, cos, sin, q_out, k_cache, v_cache, pos0, n_head, n_head_kv, k_dim, v_dim, neox=False):
    """Split the fused QKV projection, rotate Q and K, write K and V to one layer's cache.

    qkv [T, n_head*k_dim + n_head_kv*(k_dim + v_dim)]; cos/sin [T, n_rot/2] (attention scale factors
    already folded in); q_out [T, n_head, k_dim]; k_cache [n_head_kv, k_dim, capacity] (transposed, see
    attention); v_cache [n_head_kv, capacity, v_dim], each of a kv_formats.py type; position p goes to slot
    p % capacity (kv_cache.py).
    Rotated pairs: ggml's NORM mode (2i, 2i+1) on the permuted GGUF Q/K rows, or NEOX mode (i, i + n_rot/2);
    dimensions from n_rot on pass unrotated."""
    T = qkv.shape[0]
    half = cos.shape[1]
    cap = codes(k_cache).shape[2]
    k0 = n_head * k_dim
    v0 = k0 + n_head_kv * k_dim
    step, span = (1, half) if neox else (2, 1)   # pair i: elements i*step and i*step + span
    krow = np.empty(k_dim, np.float32)
    for t in range(T):
        for h in range(n_head):
            base = h * k_dim
            for i in range(half):
                a = qkv[t, base + i * step]
                b = qkv[t, base + i * step + span]
                q_out[t, h, i * step] = a * cos[t, i] - b * sin[t, i]
                q_out[t, h, i * step + span] = a * sin[t, i] + b * cos[t, i]
            for i in range(2 * half, k_dim):
                q_out[t, h, i] = qkv[t, base + i]
        p = (pos0 + t) % cap
        for g in range(n_head_kv):
            base = k0 + g * k_dim
            for i in range(half):
                a = qkv[t, base + i * step]
                b = qkv[t, base + i * step + span]
                krow[i * step] = a * cos[t, i] - b * sin[t, i]
                krow[i * step + span] = a * sin[t, i] + b * cos[t, i]
            for i in range(2 * half, k_dim):
                krow[i] = qkv[t, base + i]
            store_k(k_cache, g, p, krow)
            store_v(v_cache, g, p, qkv[t, v0 + g * v_dim:v0 + (g + 1) * v_dim])


@njit(inline="always", fastmath=True, error_model="numpy")
def _attend(q, t, g, k_cache, v_cache, p, window, softcap, scale, out, row):
    """Query token t (at position p) and K/V group g -> out[row]: attention()'s body, shared with
    attention_slots so that both give the same bits."""
    n_head, k_dim = q.shape[1], q.shape[2]
    n_head_kv = codes(k_cache).shape[0]
    cap = codes(k_cache).shape[2]
    v_dim = codes(v_cache).shape[2]
    group = n_head // n_head_kv
    h0 = g * group
    lo = max(0, p - window + 1) if window > 0 else 0   # first position seen
    n = p - lo + 1
    first = lo % cap
    n1 = min(n, cap - first)   # positions lo.. in slots first..first+n1-1, the rest in slots 0..
    scores = np.zeros((group, n), np.float32)
    n2 = n - n1
    kb = scratch(k_cache, 8, n)   # K rows widened to float32 (a cache of f32 is read in place)
    i = 0
    while i + 4 <= k_dim:   # four K rows per pass: a quarter of the loads/stores of `scores`
        # views of both runs (an offset index in the inner loop would keep LLVM from vectorizing it)
        a0, a1 = k_run(k_cache, g, i, first, n1, kb[0]), k_run(k_cache, g, i + 1, first, n1, kb[1])
        a2, a3 = k_run(k_cache, g, i + 2, first, n1, kb[2]), k_run(k_cache, g, i + 3, first, n1, kb[3])
        b0, b1 = k_run(k_cache, g, i, 0, n2, kb[4]), k_run(k_cache, g, i + 1, 0, n2, kb[5])
        b2, b3 = k_run(k_cache, g, i + 2, 0, n2, kb[6]), k_run(k_cache, g, i + 3, 0, n2, kb[7])
        for hh in range(group):
            q0 = q[t, h0 + hh, i] * scale
            q1 = q[t, h0 + hh, i + 1] * scale
            q2 = q[t, h0 + hh, i + 2] * scale
            q3 = q[t, h0 + hh, i + 3] * scale
            _add_dot4(scores[hh, :n1], a0, a1, a2, a3, q0, q1, q2, q3)
            if n2:
                _add_dot4(scores[hh, n1:], b0, b1, b2, b3, q0, q1, q2, q3)
        i += 4
    while i < k_dim:
        a0, b0 = k_run(k_cache, g, i, first, n1, kb[0]), k_run(k_cache, g, i, 0, n2, kb[4])
        for hh in range(group):
            qi = q[t, h0 + hh, i] * scale
            sc = scores[hh]
            for s in range(n1):
                sc[s] += qi * a0[s]
            for s in range(n2):
                sc[n1 + s] += qi * b0[s]
        i += 1
    totals = np.empty(group, np.float32)
    for hh in range(group):
        sc = scores[hh]
        if softcap > 0:
            for s in range(n):
                sc[s] = softcap * np.float32(math.tanh(sc[s] / softcap))
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
    vb = scratch(v_cache, 4, v_dim)
    s = 0
    while s + 4 <= n:
        v0 = v_row(v_cache, g, _slot(first + s, cap), vb[0])
        v1 = v_row(v_cache, g, _slot(first + s + 1, cap), vb[1])
        v2 = v_row(v_cache, g, _slot(first + s + 2, cap), vb[2])
        v3 = v_row(v_cache, g, _slot(first + s + 3, cap), vb[3])
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
        vrow = v_row(v_cache, g, _slot(first + s, cap), vb[0])
        for hh in range(group):
            p0 = scores[hh, s]
            oh = o[hh]
            for i in range(v_dim):
                oh[i] += p0 * vrow[i]
        s += 1
    for hh in range(group):
        inv = np.float32(1.0) / totals[hh]
        for i in range(v_dim):
            out[row, (h0 + hh) * v_dim + i] = o[hh, i] * inv


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def attention(q, k_cache, v_cache, pos0, scale, out, window=0, softcap=0.0):
    """Causal softmax attention with grouped K/V heads.

    q [T, n_head, k_dim] for positions pos0..; k_cache [n_head_kv, k_dim, capacity] and v_cache
    [n_head_kv, capacity, v_dim] holding the positions the queries see, position p in slot p % capacity
    (kv_cache.py); out [T, n_head*v_dim]. window > 0: query p sees positions p-window+1 .. p only
    (sliding-window attention). softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2).
    K is stored transposed so that the scores of all positions build up as contiguous multiply-adds
    (vectorized over positions, no per-position horizontal sum); the positions a query sees are at most
    two contiguous runs of slots (a ring wraps once). The heads sharing a K/V group are handled together,
    so each cached K/V row is fetched once (from L1 for the group's other heads)."""
    T = q.shape[0]
    n_head_kv = codes(k_cache).shape[0]
    for job in prange(T * n_head_kv):
        t = job // n_head_kv
        _attend(q, t, job % n_head_kv, k_cache, v_cache, pos0 + t, window, softcap, scale, out, t)


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def attention_slots(q, k_pool, v_pool, slots, pos, scale, out, window=0, softcap=0.0):
    """attention() for one new token of each of several sequences, in one launch: q [B, n_head, k_dim], token
    b at position pos[b] of the caches k_pool[slots[b]] / v_pool[slots[b]] ([n_slots, ...] pools of
    attention()'s cache layout); out [B, n_head*v_dim]. Each row equals attention() of that sequence alone."""
    B = q.shape[0]
    n_head_kv = codes(k_pool).shape[1]
    for job in prange(B * n_head_kv):
        b = job // n_head_kv
        k = slots[b]
        _attend(q[b:b + 1], 0, job % n_head_kv, take(k_pool, k), take(v_pool, k), pos[b], window, softcap, scale,
                out, b)


@njit(inline="always", fastmath=True)
def _add_dot4(sc, k0, k1, k2, k3, q0, q1, q2, q3):
    for s in range(sc.shape[0]):
        sc[s] += q0 * k0[s] + q1 * k1[s] + q2 * k2[s] + q3 * k3[s]


@njit(inline="always")
def _slot(j, cap):
    """Slot of the j-th position counted from slot 0 of the first run (first + s, wrapping once)."""
    return j - cap if j >= cap else j


@njit(fastmath=True, cache=True, error_model="numpy")
def swiglu(gate_up, n_ff, out):
    """out = silu(gate) * up, where gate_up [T, 2*n_ff] holds gate then up for each token."""
    T = gate_up.shape[0]
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[t, n_ff + i]


@njit(fastmath=True, cache=True)
def geglu(gate_up, n_ff, out):
    """out = gelu_tanh(gate) * up (Gemma's GELU, tanh approximation, as HF's gelu_pytorch_tanh), gate_up as swiglu.
    0.5 x (1 + tanh(u)) = x * sigmoid(2u): one exp per element, which vectorizes (tanh does not)."""
    T = gate_up.shape[0]
    c = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            e = np.float32(math.exp(c * (g + np.float32(0.044715) * g * g * g)))
            out[t, i] = g / (np.float32(1.0) + e) * gate_up[t, n_ff + i]


QUERY_CHUNK = 256   # prefill attention: queries per score matrix (bounds its memory)


def attention_blas(q, k_cache, v_cache, pos0, scale, out, window=0, softcap=0.0):
    """attention() for many queries at once: per K/V group, scores and the weighted sum of V are two
    BLAS products over a chunk of queries (same inputs, layouts and result; ~5x faster for long prompts)."""
    limit_blas_threads()   # BLAS's own worker threads would fight numba's (runtime.py)
    T, n_head, k_dim = q.shape
    n_head_kv = codes(k_cache).shape[0]
    cap = codes(k_cache).shape[2]
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
