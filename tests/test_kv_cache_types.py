"""KV cache types (llama-cpp-python's type_k / type_v, the CLI's --cache-type-k/-v): f32, f16 (the default) and
q8_0. Fidelity against float32 transformers on every kernel path (BLAS and numba attention, decode, the
server's batched decode), the conversions against numpy, memory, and one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from numba import njit

from helpers.tiny_gguf import TinySpec, hf_model, mean_kl, reference_logits, reference_model_from_gguf, write_gguf
from llmrun.engine.kv_cache import new_k, new_v
from llmrun.engine.model import LlamaModel
from llmrun.errors import InvalidArgumentError, LlmrunError
from llmrun.gguf import GGUFReader
from llmrun.kernels import kv_formats, ops

# Mean KL to the float32 reference. f32 and f16 hold the engine's bound; q8_0 (8-bit K and V, ggml's format)
# cannot: ~6e-5 on tiny models, ~1e-3 on SmolLM2 (llama.cpp's whole pipeline: 4e-3 to 8e-3).
BOUND = {"f32": 1e-5, "f16": 1e-5, "q8_0": 2e-3}
KV = [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("f32", "q8_0"), ("q8_0", "f16")]


def _bound(kv):
    return max(BOUND[t] for t in kv)


def _load(path, kv, n_ctx=96):
    with GGUFReader(path) as r:
        return LlamaModel.load(r, n_ctx=n_ctx, type_k=kv[0], type_v=kv[1])


@pytest.fixture(scope="module", params=["q8_0", "q4_k"])
def tiny(request, tmp_path_factory):
    spec = TinySpec(qtype=request.param, hidden=256, ff=256, heads=4, kv_heads=2, seed=11)   # head_dim 64
    path = write_gguf(tmp_path_factory.mktemp("kv") / f"{request.param}.gguf", hf_model(spec), spec)
    ids = [int(t) for t in np.random.default_rng(2).integers(0, spec.vocab, 48)]
    return path, ids, reference_logits(reference_model_from_gguf(path), ids)


@pytest.mark.parametrize("kv", KV, ids=lambda kv: "/".join(kv))
def test_every_path_within_the_bound(tiny, kv):
    path, ids, ref = tiny
    m = _load(path, kv)
    bound = _bound(kv)
    assert mean_kl(ref, m.forward(ids, all_logits=True)) <= bound                 # BLAS attention, prefill
    m.reset()
    chunks = np.concatenate([m.forward(ids[i:i + 6], all_logits=True) for i in range(0, 48, 6)])
    assert mean_kl(ref, chunks) <= bound                                          # numba attention
    m.truncate(40)
    assert mean_kl(ref[40:], np.stack([m.forward([t]) for t in ids[40:]])) <= bound   # decode
    # the server's path: pooled caches, one batched decode step for both sequences at once
    a, b = m.new_caches(2)
    m.forward_batch([a, b], [ids[:30], ids[:20]])
    rows = [m.forward_batch([a, b], [[ids[30 + i]], [ids[20 + i]]]) for i in range(4)]
    got = np.concatenate([np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])])
    assert mean_kl(np.concatenate([ref[30:34], ref[20:24]]), got) <= bound


def test_default_model_f16_cache(default_model):
    """SmolLM2 (a real model): f16 within the bound on prefill and decode, and the default."""
    ids = [int(t) for t in np.random.default_rng(5).integers(0, 49152, 64)]
    ref = reference_logits(reference_model_from_gguf(default_model), ids)
    with GGUFReader(default_model) as r:
        m = LlamaModel.load(r, n_ctx=128)
    assert m.kv_types == ("f16", "f16")
    assert mean_kl(ref, m.forward(ids, all_logits=True)) <= BOUND["f16"]
    m.truncate(48)
    assert mean_kl(ref[48:], np.stack([m.forward([t]) for t in ids[48:]])) <= BOUND["f16"]


def test_kv_memory_per_type(tiny):
    path = tiny[0]
    size = {kv: _load(path, kv, n_ctx=64).kv_nbytes for kv in KV}
    f32 = size[("f32", "f32")]
    assert size[("f16", "f16")] * 2 == f32
    assert size[("q8_0", "q8_0")] * 64 == f32 * 17          # 1 byte + a 2-byte scale per 32 values
    assert size[("f32", "q8_0")] == (f32 + size[("q8_0", "q8_0")]) // 2


@njit
def _to_half(x, out):
    for i in range(x.shape[0]):
        out[i] = kv_formats.f32_to_half(x[i])


@njit
def _from_half(h, out):
    for i in range(h.shape[0]):
        out[i] = kv_formats.half_to_f32(h[i])


@njit
def _widen(h, out, n):
    kv_formats._widen_halves(h, out, n)


def test_vector_widening_of_halves_is_exact_and_stays_in_its_run():
    """The cache's halves widened 16 at a time (and a masked rest) equal numpy's conversion, for every finite
    half and every run length, and nothing past the run is written."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bits = bits[np.isfinite(bits.view(np.float16))]
    want = bits.view(np.float16).astype(np.float32)
    out = np.full(bits.size, -1.0, np.float32)
    _widen(bits, out, bits.size)
    np.testing.assert_array_equal(out, want)
    for n in range(0, 40):
        out = np.full(48, -7.0, np.float32)
        _widen(bits[1000:1048], out, n)
        np.testing.assert_array_equal(out[:n], want[1000:1000 + n])
        assert (out[n:] == -7.0).all()


def test_half_conversions_equal_numpy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-9, 5, 100_000)).astype(np.float32),
                        np.array([0.0, -0.0, 65504, 65519.99, 65520, 6e-8, 2.9802322e-08, np.inf, -np.inf],
                                 np.float32)])
    got = np.empty(x.size, np.uint16)
    _to_half(x, got)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(np.float16)).all()
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    back = np.empty(bits.size, np.float32)
    _from_half(bits, back)
    np.testing.assert_array_equal(back[finite], bits.view(np.float16)[finite].astype(np.float32))


def _filled(kind, rng, T=7, n_head=4, n_kv=2, hd=64, cap=12):
    qkv = (rng.standard_normal((T, (n_head + 2 * n_kv) * hd)) * rng.uniform(0.1, 30, (1, (n_head + 2 * n_kv) * hd))
           ).astype(np.float32)
    th = rng.uniform(0, 6, (T, hd // 2))
    q = np.empty((T, n_head, hd), np.float32)
    k, v = new_k((), n_kv, hd, cap, kind), new_v((), n_kv, hd, cap, kind)
    ops.rope_store(qkv, np.cos(th).astype(np.float32), np.sin(th).astype(np.float32), q, k, v, 3, n_head, n_kv, hd,
                   hd, False)
    return q, k, v


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_stored_values_and_attention_over_them(kind):
    """What a typed cache holds is the f32 cache rounded (f16: to nearest; q8_0: within half a step of each
    32-block's scale), and attention over it equals attention over those values in float32, bit for bit."""
    rng = np.random.default_rng(3)
    q, k, v = _filled(kind, rng)
    _, k32, v32 = _filled("f32", np.random.default_rng(3))
    K = np.stack([kv_formats.k_f32(k, g, slice(0, 12)) for g in range(2)])
    V = np.stack([kv_formats.v_f32(v, g, slice(0, 12)) for g in range(2)])
    k32 = np.stack([kv_formats.k_f32(k32, g, slice(0, 12)) for g in range(2)])   # [2, 64, 12] like K
    if kind == "f16":
        np.testing.assert_array_equal(K, k32.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(V, v32.astype(np.float16).astype(np.float32))
    else:
        for got, want, axis in ((K, k32, 1), (V, v32, 2)):
            blocks = np.moveaxis(want, axis, -1).reshape(*np.moveaxis(want, axis, -1).shape[:-1], -1, 32)
            step = np.abs(blocks).max(-1, keepdims=True) / 127
            err = np.abs(np.moveaxis(got, axis, -1).reshape(blocks.shape) - blocks)
            assert (err <= 0.5 * step * (1 + 2 ** -9) + 1e-30).all()
    for fn in (ops.attention, ops.attention_blas):
        typed = np.empty((7, 4 * 64), np.float32)
        plain = np.empty_like(typed)
        fn(q, k, v, 3, np.float32(0.125), typed, 0, np.float32(0))
        fn(q, np.ascontiguousarray(K[:, None]), np.ascontiguousarray(V), 3, np.float32(0.125), plain, 0,
           np.float32(0))   # K as one block of 12 positions (kv_formats.py)
        np.testing.assert_array_equal(typed, plain)


def test_type_names_and_errors(tmp_path):
    assert kv_formats.kv_type(None, "type_k") == "f16"
    assert [kv_formats.kv_type(v, "type_k") for v in (0, 1, 8, "F16", "q8_0")] == ["f32", "f16", "q8_0", "f16", "q8_0"]
    for bad in ("q4_0", 2, True, 1.0, ""):
        with pytest.raises(InvalidArgumentError, match="type_k must be one of"):
            kv_formats.kv_type(bad, "type_k")
    spec = TinySpec(qtype="f32")   # head size 16: q8_0 needs multiples of 32
    path = write_gguf(tmp_path / "small_heads.gguf", hf_model(spec), spec)
    with pytest.raises(LlmrunError, match="multiples of 32") as e:
        _load(path, ("f16", "q8_0"))
    assert "\n" not in str(e.value)
    assert _load(path, ("f16", "f16")).kv_types == ("f16", "f16")


def test_cli_cache_types(default_model):
    def run(*extra):
        return subprocess.run([sys.executable, "-m", "llmrun.cli", "run", str(default_model), "-p",
                               "The capital of France is", "-n", "4", "--temp", "0", *extra],
                              capture_output=True, text=True, timeout=600)
    f16, q8 = run(), run("--cache-type-k", "q8_0", "--cache-type-v", "q8_0")
    assert f16.returncode == 0 and q8.returncode == 0, q8.stderr
    assert "Paris" in f16.stdout and "Paris" in q8.stdout
    bad = run("--cache-type-k", "q4_0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
