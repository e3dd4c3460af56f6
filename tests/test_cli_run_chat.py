"""`llmrun run`, `llmrun chat` (piped stdin, cache reuse across turns) and `llmrun perplexity`."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from llmrun.errors import LlmrunError
from llmrun.tools.perplexity import perplexity


def _llmrun(*args, stdin=None, env=None, timeout=600):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "llmrun.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def _one_line_error(res):
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr


STATS = re.compile(r"\[prompt (\d+) tokens: (\d+) evaluated, (\d+) cached \| answer (\d+) tokens, [\d.]+ tok/s\]")


def test_chat_piped_two_turns_reuses_cache(default_model):
    res = _llmrun("chat", default_model, "--temp", "0", "-n", "24", "--ctx", "1024",
                  stdin="What is the capital of France?\nAnd what is the capital of Italy?\n/exit\n")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "Paris" in res.stdout
    turns = [tuple(map(int, m)) for m in STATS.findall(res.stderr)]
    assert len(turns) == 2, res.stderr
    (p1, e1, c1, n1), (p2, e2, c2, n2) = turns
    assert (e1, c1) == (p1, 0)                 # first turn: everything is new
    assert c2 >= p1                            # the whole first turn comes from the cache ...
    assert e2 == p2 - c2 and e2 < p2 - p1      # ... only the new turn (and template glue) is evaluated
    assert e2 <= (p2 - p1 - n1) + 3            # at most a few tokens of the first answer are re-tokenized


def test_chat_commands_context_full_and_eof(default_model):
    long_line = "please " * 80
    res = _llmrun("chat", default_model, "--temp", "0", "-n", "4", "--ctx", "64", "--system", "Be terse.",
                  stdin=f"/bogus\n{long_line}\n/reset\nHi\n/system You are a pirate.\n")   # EOF, no /exit
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "unknown command /bogus" in res.stderr
    assert "context window full" in res.stderr and "/reset" in res.stderr    # reported, not fatal
    assert "conversation reset" in res.stderr and "new system prompt" in res.stderr
    assert len(STATS.findall(res.stderr)) == 1   # only "Hi" was answered


def test_chat_ctrl_c_stops_the_answer_not_the_program(default_model):
    proc = subprocess.Popen([sys.executable, "-m", "llmrun.cli", "chat", str(default_model), "--temp", "0",
                             "-n", "400", "--ctx", "1024"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=0)
    try:
        proc.stdin.write("Write a long story about a dragon.\n")
        proc.stdin.flush()
        first = proc.stdout.read(1)          # the answer has started streaming
        assert first
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "answer stopped" in err and "Traceback" not in err
    (stats,) = STATS.findall(err)
    assert int(stats[3]) < 400


def test_run_with_n_predict_and_default_model(default_model):
    # MODEL omitted: $LLMRUN_MODEL names the default model
    res = _llmrun("run", "-p", "The capital of France is", "-n", "6", "--temp", "0", "-v", "--ctx", "128",
                  env={"LLMRUN_MODEL": str(default_model)})
    assert res.returncode == 0, res.stderr
    assert "generated 6 tokens" in res.stderr and "finish_reason: length" in res.stderr
    assert "Paris" in res.stdout
    assert not res.stdout.startswith("The capital")     # the prompt is not echoed


@pytest.mark.parametrize("cmd", [["run", "-p", "hi"], ["chat"]])
def test_corrupt_model_is_one_line_error(tmp_path, cmd):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    res = _llmrun(cmd[0], bad, *cmd[1:], stdin="hi\n")
    _one_line_error(res)
    assert "bad.gguf" in res.stderr


def test_missing_default_model_says_what_to_do(tmp_path):
    res = _llmrun("run", "-p", "hi", env={"LLMRUN_MODEL": str(tmp_path / "nope.gguf")})
    _one_line_error(res)
    assert "nope.gguf" in res.stderr


# ---- perplexity ------------------------------------------------------------------------------------------
class Bigram:
    """Predicts (t+1) % V with probability A; every other token equally likely. Records what it evaluates."""
    V, A = 50, 0.6

    def __init__(self):
        self.windows, self.seq = [], []

    def reset(self):
        if self.seq:
            self.windows.append(self.seq)
        self.seq = []

    def forward(self, tokens, all_logits=False):
        self.seq = self.seq + list(tokens)
        rows = np.full((len(tokens), self.V), math.log((1 - self.A) / (self.V - 1)), dtype=np.float32)
        for i, t in enumerate(tokens):
            rows[i, (t + 1) % self.V] = math.log(self.A)
        return rows if all_logits else rows[-1]


def test_perplexity_llama_cpp_windows_against_closed_form():
    rng = np.random.default_rng(0)
    tokens = [3]
    for _ in range(16 * 3 + 5 - 1):   # 3 full windows of 16 and a partial one that must be ignored
        tokens.append((tokens[-1] + 1) % 50 if rng.random() < 0.7 else int(rng.integers(50)))
    m = Bigram()
    r = perplexity(m, tokens, n_ctx=16, bos_id=49)
    m.reset()
    # the model saw exactly 3 windows, BOS in front, non-overlapping, the last token of each never evaluated
    assert [len(w) for w in m.windows] == [15, 15, 15]
    for c, w in enumerate(m.windows):
        assert w == [49] + tokens[c * 16 + 1:c * 16 + 15]
    # closed form: score targets at window positions 9..15 (second half), each from its predecessor
    nll = []
    for c in range(3):
        for j in range(8, 15):
            prev, target = tokens[c * 16 + j], tokens[c * 16 + j + 1]
            p = 0.6 if target == (prev + 1) % 50 else 0.4 / 49
            nll.append(-math.log(p))
    nll = np.array(nll)
    assert r.n_chunks == 3 and r.n_scored == len(nll) == 21
    assert r.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert r.err == pytest.approx(math.sqrt(nll.var() / (len(nll) - 1)) * math.exp(nll.mean()), rel=1e-6)


def test_perplexity_needs_two_windows():
    with pytest.raises(LlmrunError, match="at least 32"):
        perplexity(Bigram(), list(range(31)), n_ctx=16)


def test_perplexity_command(default_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)   # ~80 tokens: 2 windows of 32
    res = _llmrun("perplexity", default_model, "-f", text, "--ctx", "32")
    assert res.returncode == 0, res.stderr
    m = re.search(r"PPL = ([\d.]+) \+/- ([\d.]+)", res.stdout)
    assert m, res.stdout
    ppl, err = float(m.group(1)), float(m.group(2))
    # a repeated sentence is very predictable for any working LM: far below the vocabulary size
    assert 1.0 <= ppl < 20 and err >= 0
    short = tmp_path / "s.txt"
    short.write_text("too short")
    _one_line_error(_llmrun("perplexity", default_model, "-f", short, "--ctx", "32"))
