"""`llmrun bench` and the pieces of `make bench` (no timing assertions: the machine is shared)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from llmrun.tools.bench import bench_model
from bench_compare import CASES, Case, _geomean, format_table, select_cases
from llmrun.cli import main
from llmrun.errors import LlmrunError


class RecordingModel:
    """Stands in for LlamaModel: records every reset and the token batches it is fed."""

    def __init__(self, n_ctx=64, n_vocab=100):
        self.n_ctx = n_ctx
        self.hparams = SimpleNamespace(n_vocab=n_vocab)
        self.n_past = 0
        self.calls = []

    def reset(self):
        self.calls.append("reset")
        self.n_past = 0

    def forward(self, tokens, all_logits=False):
        tokens = list(tokens)
        assert all(0 <= t < self.hparams.n_vocab for t in tokens)
        assert self.n_past + len(tokens) <= self.n_ctx
        self.calls.append(len(tokens))
        self.n_past += len(tokens)
        return np.zeros(self.hparams.n_vocab, dtype=np.float32)


def test_bench_model_protocol():
    # Each pass: empty cache, the prompt as ONE batch, then n_gen single tokens; warm-up + R passes.
    m = RecordingModel()
    pp, tg, warmup_s = bench_model(m, n_prompt=8, n_gen=4, repetitions=2)
    one_pass = ["reset", 8, 1, 1, 1, 1]
    assert m.calls == one_pass * 3 + ["reset"]
    assert len(pp) == len(tg) == 2
    assert all(v > 0 for v in pp + tg) and warmup_s >= 0


def test_bench_model_rejects_what_does_not_fit():
    with pytest.raises(LlmrunError, match="context"):
        bench_model(RecordingModel(n_ctx=10), n_prompt=8, n_gen=4)
    with pytest.raises(LlmrunError):
        bench_model(RecordingModel(), n_prompt=0, n_gen=0)


def test_cli_bench_json_on_default_model(default_model):
    res = CliRunner().invoke(main, ["bench", str(default_model), "-p", "8", "-n", "4", "--threads", "1",
                                    "--repetitions", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n_prompt"] == 8 and out["n_gen"] == 4 and out["threads"] == 1
    for key in ("pp_tps", "tg_tps"):
        assert isinstance(out[key], float) and math.isfinite(out[key]) and out[key] > 0
    assert len(out["pp_tps_runs"]) == len(out["tg_tps_runs"]) == 1
    assert out["model_type"] == "MOSTLY_Q4_1"
    # SmolLM2-135M: ~135 M parameters, tied embeddings stored once.
    assert 120e6 < out["n_params"] < 150e6


def test_cli_bench_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    res = CliRunner().invoke(main, ["bench", str(bad), "-p", "8", "-n", "4"])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    assert "Traceback" not in res.output


def test_compare_table_ratios_and_geometric_mean():
    a, b = Case("a-case", "tinyllama", "q4_0", 1), Case("b-case", "tinyllama", "q8_0", 2)
    rows = [(a, {"llmrun": {"pp_tps": 50.0, "tg_tps": 10.0}, "llama.cpp": {"pp_tps": 100.0, "tg_tps": 40.0}}),
            (b, {"llmrun": {"pp_tps": 200.0, "tg_tps": 30.0}, "llama.cpp": {"pp_tps": 100.0, "tg_tps": 30.0}})]
    table = format_table(rows, have_llamacpp=True)
    assert "0.500" in table and "0.250" in table and "2.000" in table
    last = table.splitlines()[-1]
    assert last.startswith("geometric mean")
    assert last.split()[-2:] == ["1.000", "0.500"]   # sqrt(0.5*2), sqrt(0.25*1)
    assert _geomean([]) is None


def test_compare_case_selection():
    assert [c.model for c in select_cases(None, quick=True)] == ["smollm2"]
    assert select_cases(None, quick=False) == CASES
    assert {c.qtype for c in select_cases(["tinyllama-q4_0"], quick=False)} == {"q4_0"}
    assert {(c.qtype, c.threads) for c in CASES} == {("q4_0", 1), ("q4_0", 2), ("q8_0", 2), ("q4_k_m", 1), ("q4_k_m", 2),
                                                      ("q5_k_m", 1), ("q5_k_m", 2), ("q4_1", 2)}


def test_compare_gives_llamacpp_the_users_environment_not_llmruns():
    # llmrun sets GOMP_SPINCOUNT for its own process when imported (llmrun/runtime.py); the benchmark must capture
    # the user's environment before that, so llama.cpp's worker runs at its own defaults.
    import os
    import subprocess
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_compare, llmrun.engine.model, os; "
            "print(os.environ.get('GOMP_SPINCOUNT'), bench_compare._USER_ENV.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code, str(bench_dir)], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["20000", "None"]
