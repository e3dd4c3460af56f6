"""The ops the relatives add, against numpy/torch float64 references: GeGLU, per-head RMSNorm, NEOX and
partial RoPE, and attention with a sliding window, a soft-cap and ring-buffer slots (both kernels)."""
from __future__ import annotations

import numpy as np
import pytest

from llmrun.kernels import ops


def test_geglu_matches_torch_gelu_tanh():
    import torch
    x = (np.random.default_rng(0).standard_normal((3, 2 * 80)) * 4).astype(np.float32)
    out = np.empty((3, 80), np.float32)
    ops.geglu(x, 80, out)
    g, u = torch.from_numpy(x[:, :80]).double(), torch.from_numpy(x[:, 80:]).double()
    want = (torch.nn.functional.gelu(g, approximate="tanh") * u).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_activations_stay_finite_on_large_inputs(name):
    """Large pre-activations (Gemma's reach -10 and beyond) through the vectorized loops: exp overflowing in a
    fast-math loop once gave NaN. Against torch's float64 silu / gelu_tanh over 1e-3 .. 1e4 in magnitude."""
    import torch
    rng = np.random.default_rng(3)
    n_ff = 1024
    mag = 10.0 ** rng.uniform(-3, 4, (4, n_ff))
    gate = (rng.choice([-1.0, 1.0], (4, n_ff)) * mag).astype(np.float32)
    up = rng.uniform(-2, 2, (4, n_ff)).astype(np.float32)
    x = np.concatenate([gate, up], axis=1)
    out = np.empty((4, n_ff), np.float32)
    getattr(ops, name)(x, n_ff, out)
    g, u = torch.from_numpy(gate).double(), torch.from_numpy(up).double()
    act = torch.nn.functional.silu(g) if name == "swiglu" else torch.nn.functional.gelu(g, approximate="tanh")
    want = (act * u).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=1e-5)


def test_head_rmsnorm_in_place_per_head():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3 * 8 + 5)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    before = x.copy()
    ops.head_rmsnorm(x, 5, 3, w, np.float32(1e-6))
    heads = before[:, 5:].reshape(2, 3, 8).astype(np.float64)
    want = heads / np.sqrt((heads ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(x[:, 5:].reshape(2, 3, 8), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[:, :5], before[:, :5])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_store_pairs_partial_rotation_and_ring_slots(neox):
    rng = np.random.default_rng(2)
    T, nh, nkv, hd, n_rot, cap, pos0 = 3, 2, 1, 8, 4, 5, 4   # positions 4..6 -> slots 4, 0, 1
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * hd)).astype(np.float32)
    theta = rng.uniform(0, 6, (T, n_rot // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    q = np.empty((T, nh, hd), np.float32)
    k = np.zeros((nkv, 1, hd, cap), np.float32)   # one block of `cap` positions (kv_formats.py)
    v = np.zeros((nkv, cap, hd), np.float32)
    ops.rope_store(qkv, cos, sin, q, k, v, pos0, nh, nkv, hd, hd, neox)

    def rotate(x):   # x [T, hd]
        out = x.astype(np.float64).copy()
        half = n_rot // 2
        for i in range(half):
            a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
            out[:, a] = x[:, a] * np.cos(theta[:, i]) - x[:, b] * np.sin(theta[:, i])
            out[:, b] = x[:, a] * np.sin(theta[:, i]) + x[:, b] * np.cos(theta[:, i])
        return out
    for h in range(nh):
        np.testing.assert_allclose(q[:, h], rotate(qkv[:, h * hd:(h + 1) * hd]), rtol=1e-5, atol=1e-6)
    slots = [(pos0 + t) % cap for t in range(T)]
    np.testing.assert_allclose(k[0, 0][:, slots].T, rotate(qkv[:, nh * hd:(nh + 1) * hd]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v[0][slots], qkv[:, (nh + 1) * hd:])


def _reference(q, keys, values, positions, window, softcap, scale):
    """keys/values [n_kv, n_pos, d] for absolute positions 0..n_pos-1; q [T, n_head, d] at `positions`."""
    T, n_head, _ = q.shape
    group = n_head // keys.shape[0]
    out = np.zeros((T, n_head, values.shape[2]))
    for t, p in enumerate(positions):
        lo = max(0, p - window + 1) if window else 0
        for h in range(n_head):
            s = keys[h // group, lo:p + 1].astype(np.float64) @ q[t, h] * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            e = np.exp(s - s.max())
            out[t, h] = (e / e.sum()) @ values[h // group, lo:p + 1]
    return out.reshape(T, -1)


@pytest.mark.parametrize("kernel", ["attention", "attention_blas"])
@pytest.mark.parametrize("window,softcap,cap", [(4, 0.0, 40), (4, 0.0, 7), (0, 2.0, 40), (5, 1.5, 9)])
def test_attention_window_softcap_ring(kernel, window, softcap, cap, monkeypatch):
    monkeypatch.setattr(ops, "QUERY_CHUNK", 2)
    rng = np.random.default_rng(3)
    n_head, n_kv, d, pos0, T = 4, 2, 16, 20, 3
    if cap < 40:
        T = cap - window + 1      # what one forward may write into a ring (kv_cache.py)
    keys = rng.standard_normal((n_kv, pos0 + T, d)).astype(np.float32)
    values = rng.standard_normal((n_kv, pos0 + T, d)).astype(np.float32)
    q = rng.standard_normal((T, n_head, d)).astype(np.float32)
    k_cache = np.zeros((n_kv, 1, d, cap), np.float32)   # one block of `cap` positions (kv_formats.py)
    v_cache = np.zeros((n_kv, cap, d), np.float32)
    for p in range(pos0 + T):      # written in order: a ring keeps the last `cap` positions
        k_cache[:, 0, :, p % cap] = keys[:, p]
        v_cache[:, p % cap] = values[:, p]
    out = np.empty((T, n_head * d), np.float32)
    getattr(ops, kernel)(q, k_cache, v_cache, pos0, np.float32(0.3), out, window, np.float32(softcap))
    want = _reference(q, keys, values, range(pos0, pos0 + T), window, softcap, 0.3)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
