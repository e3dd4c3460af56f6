"""The engines bench_compare.py times, each in a worker process of its own (their OpenMP thread pools would
otherwise fight over the cores): llmrun and llama.cpp (through llama-cpp-python) behind one reset/eval
interface, the same timed pass for both, and the worker that answers the parent's requests."""
from __future__ import annotations

import os

# The user's environment, taken before anything can import llmrun (whose runtime.py sets defaults such as
# OMP_WAIT_POLICY for its own process): the llama.cpp worker runs with exactly this. bench_compare.py imports
# this module first.
USER_ENV = dict(os.environ)

import contextlib
import multiprocessing as mp
import time
from pathlib import Path


class _LlmrunEngine:
    name = "llmrun"

    def __init__(self, path: str, threads: int, n_ctx: int):
        from llmrun.tools.bench import _use_threads
        from llmrun.gguf import GGUFReader
        from llmrun.engine.model import LlamaModel   # imports the kernels (and their OpenMP settings) before numba's pool

        self.model = LlamaModel.load(GGUFReader(path), n_ctx=n_ctx, n_threads=threads)
        _use_threads(threads)
        self.n_vocab = self.model.hparams.n_vocab

    def reset(self):
        self.model.reset()

    def eval(self, tokens):
        self.model.forward(tokens)


class _LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int):
        from llama_cpp import Llama

        n_batch = max(n_ctx, 512)  # the whole prompt is one llama_decode call
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self):
        self.llm.reset()           # the next eval removes every cached position (memory_seq_rm from 0)

    def eval(self, tokens):
        self.llm.eval(tokens)      # llama_decode of all tokens in one batch (n_batch >= n_ctx)


def _timed_pass(eng, prompt, gen) -> tuple[float, float, float, float]:
    """The same measurement for both engines: (pp wall s, tg wall s, pp cpu s, tg cpu s).
    CPU time (all threads of the worker) is kept too: on a busy machine it shows the work done."""
    eng.reset()
    w0, c0 = time.perf_counter(), time.process_time()
    if prompt:
        eng.eval(prompt)
    w1, c1 = time.perf_counter(), time.process_time()
    for tok in gen:
        eng.eval((tok,))
    w2, c2 = time.perf_counter(), time.process_time()
    return w1 - w0, w2 - w1, c1 - c0, c2 - c1


ENGINES = {"llmrun": _LlmrunEngine, "llama.cpp": _LlamaCppEngine}


def _worker(conn, engine: str, path: str, threads: int, n_ctx: int) -> None:
    """Child process: load once, then answer ("pass", prompt, gen) requests with (pp_s, tg_s)."""
    try:
        t = time.perf_counter()
        eng = ENGINES[engine](path, threads, n_ctx)
        conn.send(("ready", {"n_vocab": eng.n_vocab, "load_s": time.perf_counter() - t}))
        while True:
            msg = conn.recv()
            if msg[0] == "quit":
                break
            conn.send(("ok", _timed_pass(eng, msg[1], msg[2])))
    except BaseException as e:  # report, never hang the parent
        try:
            conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
        except OSError:
            pass
    finally:
        conn.close()


@contextlib.contextmanager
def _environment(env: dict):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Worker:
    def __init__(self, engine: str, path: Path, threads: int, n_ctx: int, omp_wait: str | None = None):
        ctx = mp.get_context("spawn")
        self.engine = engine
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, engine, str(path), threads, n_ctx), daemon=True)
        # A spawned child inherits os.environ as it is at start(), and libgomp reads OMP_WAIT_POLICY when it
        # loads: start it under the user's own environment (plus an explicit --omp-wait, if given).
        env = dict(USER_ENV)
        if omp_wait:
            env["OMP_WAIT_POLICY"] = omp_wait
        with _environment(env):
            self.proc.start()
        child.close()
        self.info = self._recv("ready")

    def _recv(self, expected: str):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.engine} worker died (exit code {self.proc.join(5) or self.proc.exitcode})")
        if kind == "error":
            raise RuntimeError(f"{self.engine}: {payload}")
        assert kind == expected, kind
        return payload

    def timed_pass(self, prompt, gen) -> tuple[float, float, float, float]:
        self.conn.send(("pass", prompt, gen))
        return self._recv("ok")

    def close(self):
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:
        return False
