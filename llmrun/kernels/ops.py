"""Element-wise and attention kernels of the LLaMA graph (float32 throughout, like the KV cache)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(fastmath=True, cache=True)
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
    already folded in); q_out [T, n_head, k_dim]; caches [n_head_kv, n_ctx, dim].
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
                k_cache[g, p, 2 * i] = a * cos[t, i] - b * sin[t, i]
                k_cache[g, p, 2 * i + 1] = a * sin[t, i] + b * cos[t, i]
            for i in range(2 * half, k_dim):
                k_cache[g, p, i] = qkv[t, base + i]
            for i in range(v_dim):
                v_cache[g, p, i] = qkv[t, v0 + g * v_dim + i]


@njit(parallel=True, fastmath=True, cache=True)
def attention(q, k_cache, v_cache, pos0, scale, out):
    """Causal softmax attention with grouped K/V heads.

    q [T, n_head, k_dim] for positions pos0..; caches [n_head_kv, n_ctx, dim] holding positions
    0..pos0+T-1; out [T, n_head*v_dim]."""
    T, n_head, k_dim = q.shape
    n_head_kv = k_cache.shape[0]
    v_dim = v_cache.shape[2]
    group = n_head // n_head_kv
    for job in prange(T * n_head):
        t = job // n_head
        h = job % n_head
        g = h // group
        n = pos0 + t + 1
        scores = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for s in range(n):
            acc = np.float32(0.0)
            for i in range(k_dim):
                acc += q[t, h, i] * k_cache[g, s, i]
            acc *= scale
            scores[s] = acc
            mx = max(mx, acc)
        total = np.float32(0.0)
        for s in range(n):
            e = np.float32(math.exp(scores[s] - mx))
            scores[s] = e
            total += e
        o = np.zeros(v_dim, np.float32)
        for s in range(n):
            p = scores[s]
            for i in range(v_dim):
                o[i] += p * v_cache[g, s, i]
        inv = np.float32(1.0) / total
        for i in range(v_dim):
            out[t, h * v_dim + i] = o[i] * inv


@njit(fastmath=True, cache=True)
def swiglu(gate_up, n_ff, out):
    """out = silu(gate) * up, where gate_up [T, 2*n_ff] holds gate then up for each token."""
    T = gate_up.shape[0]
    for t in range(T):
        for i in range(n_ff):
            g = gate_up[t, i]
            out[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * gate_up[t, n_ff + i]
