"""The seeded, bounded fuzz suite over llmrun's entry points (issue 10): see harness.py for the rules each case
keeps and for how to add an entry point. One test per target; the counts are printed at the end of the run."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import targets_calls  # noqa: E402,F401  (registers its targets)
import targets_files  # noqa: E402,F401
import targets_server  # noqa: E402,F401
import targets_text  # noqa: E402,F401

ISOLATED_SETUP = """
from llmrun.api import Llama
from llmrun.gguf import GGUFReader
env = {{"model": {model!r}}}
with GGUFReader(env["model"]) as r:
    env["data_offset"], env["keys"] = r.data_offset, list(r.metadata)
llm = Llama(env["model"], n_ctx=32)           # warm up: imports, numba kernels, the template sandbox
llm.create_chat_completion([{{"role": "user", "content": "hi"}}], max_tokens=2, temperature=0)
llm.close()
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def env(workspace):
    import warnings

    from helpers.tiny_files import write_model
    from helpers.tiny_hf import make_lora, make_tiny_llama
    from llmrun.api import Llama

    warnings.filterwarnings("ignore", category=UserWarning)
    model = write_model(workspace / "tiny.q8_0.gguf", qtype="q8_0", n_layer=1)
    bad = workspace / "bad.gguf"
    bad.write_bytes(model.read_bytes()[:300])
    hf = make_tiny_llama(workspace / "hf", tokenizer="bpe", seed=5, num_hidden_layers=1, hidden_size=32,
                         intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    adapter = make_lora(hf, workspace / "adapter", targets=("q_proj", "v_proj"), steps=1, r=2)
    st = workspace / "st" / "model.safetensors"
    st.parent.mkdir()
    shutil.copy(hf / "model.safetensors", st)
    llm = Llama(str(model), n_ctx=48, seed=0)
    lora = targets_files.write_lora(workspace / "lora.gguf")
    return {"model": str(model), "lora": str(lora), "bad_model": str(bad), "hf": str(hf), "adapter": str(adapter),
            "safetensors": str(st), "llm": llm, "llm_vocab_only": Llama(str(model), vocab_only=True),
            "tokenizer": llm.tokenizer}


def _check(name):
    stats = harness.STATS[name]
    assert stats.cases >= harness.TARGETS[name].n_cases * 0.95, stats.cases
    assert not stats.failures, "\n".join(stats.failures[:8])
    assert stats.clean_errors and stats.successes, (stats.clean_errors, stats.successes)


@pytest.mark.parametrize("name", [n for n, t in harness.TARGETS.items() if not t.isolated])
def test_fuzz_in_process(name, env, workspace):
    harness.run_target(name, env, workspace)
    _check(name)


@pytest.mark.parametrize("name", [n for n, t in harness.TARGETS.items() if t.isolated])
def test_fuzz_isolated(name, env, workspace):
    harness.run_isolated(name, ISOLATED_SETUP.format(model=env["model"]), workspace)
    _check(name)
