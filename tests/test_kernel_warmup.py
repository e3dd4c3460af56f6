"""kernels/warmup.py: the registry holds exactly the signatures the engine compiles (one per kernel, for every
quant type of a family), a cold start compiles them in worker processes and says so in one stderr line, and a
warm start compiles nothing and says nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
from helpers.tiny_relatives import make_tiny
from llmrun.convert import convert_checkpoint
from llmrun.kernels import kv_formats, warmup

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every type the engine runs (K-quants need rows of 256), and relatives for the graph ops llama lacks.
TYPES = ["f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k",
         "q6_k"]

# Runs in a fresh process (this one may hold test-only signatures): every kind of forward on every model, then
# the signatures each llmrun kernel was compiled (or loaded from the cache) for.
_EXERCISE = r"""
import json, sys
import numpy as np
import llmrun
from numba.core.registry import CPUDispatcher
from llmrun.engine.model import LlamaModel
from llmrun.gguf import GGUFReader
from llmrun.kernels import blocks, gemm_blas, gemm_vnni, gemv, gemv_vnni, gemv_vnni_batch, ops, qmatmul, repack, token_draw
from llmrun.text.sampling import Sampler

runs = [(p, None, None) for p in sys.argv[1:]] + [(sys.argv[1], "q8_0", "f32"), (sys.argv[1], "f32", "q8_0")]
for path, type_k, type_v in runs:
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64, type_k=type_k, type_v=type_v)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, m.hparams.n_vocab, 24)]
    m.forward(ids[:20])                      # BLAS attention, many-token products
    m.forward(ids[20:22])                    # few tokens
    m.forward(ids[22:23])                    # decode
    m.reset()
    m.forward(ids[:6], all_logits=True)      # numba attention over several queries
    a, b = m.new_caches(2)                   # the server's pooled caches
    m.forward_batch([a, b], [ids[:5], ids[5:7]])
    rows = m.forward_batch([a, b], [ids[7:8], ids[8:9]])   # batched decode, pooled attention
    Sampler(seed=0).sample(rows[0])          # every generation samples
out = {}
for mod in (blocks, gemm_blas, gemm_vnni, gemv, gemv_vnni, gemv_vnni_batch, ops, qmatmul, repack, token_draw):
    for name, obj in vars(mod).items():
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == mod.__name__:
            out[f"{mod.__name__}.{name}"] = {"sigs": [repr(s) for s in obj.signatures],
                                              "cached": type(obj._cache).__name__ != "NullCache"}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama2_tokenizer_model):
    d = tmp_path_factory.mktemp("models")
    paths = []
    for qtype in TYPES:
        spec = TinySpec(qtype=qtype, hidden=256, ff=256, layers=1, heads=4, kv_heads=2, seed=len(paths))
        paths.append(write_gguf(d / f"{qtype}.gguf", hf_model(spec), spec))
    for hf_arch, tok, config in (("Gemma3ForCausalLM", "gemma", dict(head_dim=32, num_hidden_layers=2,
                                                                    sliding_window=8, final_logit_softcapping=4.0)),
                                 ("Gemma2ForCausalLM", "gemma", dict(head_dim=32, num_hidden_layers=2, sliding_window=8,
                                                                    attn_logit_softcapping=5.0)),
                                 ("Qwen3ForCausalLM", "bpe-qwen2", dict(head_dim=32))):
        hf = make_tiny(d / hf_arch, hf_arch, tokenizer=tok, spm_model=llama2_tokenizer_model)
        paths.append(convert_checkpoint(hf, d / f"{hf_arch}.gguf", out_type="q8_0"))
    return [str(p) for p in paths]


def _registered() -> dict[str, set[str]]:
    reg: dict[str, set[str]] = {}
    for unit in warmup.units().values():
        for disp, sig in unit.kernels():
            reg.setdefault(f"{disp.py_func.__module__}.{disp.py_func.__name__}", set()).add(repr(tuple(sig)))
    return reg


def test_engine_compiles_only_the_registered_signatures(models):
    proc = subprocess.run([sys.executable, "-c", _EXERCISE, *models], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    reg = _registered()
    for name, info in seen.items():
        if name in reg:
            assert set(info["sigs"]) <= reg[name], f"{name} compiled for {set(info['sigs']) - reg[name]}"
        else:   # a helper: compiled into its callers, never written to the cache on its own (warmup.py)
            assert not info["cached"], f"{name} is cached but not in warmup's registry"
    # one signature per kernel (per K and V cache type for the cache kernels), and every registered kernel this
    # host can run was used by some model
    cache_kernels = {"llmrun.kernels.ops.rope_store", "llmrun.kernels.ops.attention",
                     "llmrun.kernels.ops.attention_slots"}
    for name, sigs in reg.items():
        assert len(sigs) == (len(kv_formats.KV_TYPES) ** 2 if name in cache_kernels else 1), name
    host = {f"{d.py_func.__module__}.{d.py_func.__name__}" for n in warmup.host_units()
            for d, _ in warmup.units()[n].kernels()}
    unused = [n for n in host if not seen.get(n, {}).get("sigs")]
    assert not unused, f"registered but never run: {unused}"


def test_units_cover_each_family():
    from llmrun.kernels.repack import FP32, H16, I8, U4
    kv = ("f16", "f16")
    assert warmup.units_for({FP32}, kv) == ["graph", "attention:f16,f16"]   # float rows are not tiled
    from llmrun.kernels.qmatmul import VNNI_GEMV
    assert ({"gemv_vnni"} if VNNI_GEMV else {"gemv"}) <= set(warmup.units_for({U4, I8}, kv))
    assert "gemv_h16" in warmup.units_for({H16}, kv)
    assert "attention_slots:q8_0,f32" in warmup.units_for({U4}, ("q8_0", "f32"), batched=True)
    assert set(warmup.units_for({U4, I8, H16}, kv)) | set(warmup.units_for({U4, I8}, kv, batched=True)) \
        == set(warmup.host_units())


def test_queue_gives_each_unit_to_one_process(tmp_path):
    names = warmup.by_cost(warmup.host_units())
    costs = [warmup.units()[n].cost for n in names]
    assert costs == sorted(costs, reverse=True)
    taken = [n for n in names if warmup._claim(str(tmp_path), n)]
    assert taken == names and not any(warmup._claim(str(tmp_path), n) for n in names)


def _run_cli(path, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-m", "llmrun.cli", "run", str(path), "-p", "hello there", "-n", "3",
                           "--temp", "0"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


def test_cold_start_says_so_once_and_warm_start_not(tmp_path, llama2_tokenizer_model):
    """A fresh numba cache (a pip install): the first run prints one line and compiles in workers; the second
    run prints nothing and gives the same text."""
    hf = make_tiny(tmp_path / "hf", "LlamaForCausalLM", tokenizer="spm", spm_model=llama2_tokenizer_model)
    path = convert_checkpoint(hf, tmp_path / "tiny.gguf", out_type="f32")   # f32: the fewest kernels
    cold = _run_cli(path, tmp_path / "numba")
    assert cold.returncode == 0, cold.stderr
    lines = [ln for ln in cold.stderr.splitlines() if ln.strip()]
    assert lines == [warmup.MESSAGE.format(what="f32")]   # (the cache's type is the default: not named)
    warm = _run_cli(path, tmp_path / "numba")
    assert warm.returncode == 0 and warm.stderr.strip() == ""
    assert warm.stdout == cold.stdout
