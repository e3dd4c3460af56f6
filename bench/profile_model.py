"""Where llmrun's time goes: per kernel kind, per weight type, per layer, and Python overhead per token.

    python bench/profile_model.py MODEL.gguf [-p 128] [-n 32] [--threads 2] [--markdown]

It wraps the kernel entry points that llmrun/model.py calls (matmul / matvec / dequantize_rows and the
ops.* functions) with perf_counter timers, runs one warm-up pass, then one prefill of -p tokens and -n
single-token decodes from an empty cache. "python + numpy glue" is the forward() wall time minus the time
inside the timed kernels (the timers' own cost, ~1 us a call, lands in the kernels). An untimed pass is
run as well to show what the instrumentation costs. Nothing in llmrun is changed on disk.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

# Wall clock by default; --clock cpu uses this process's CPU time instead, which on a busy shared machine
# measures the work done (meaningful with --threads 1; with more threads spin-waits count too).
CLOCK = time.perf_counter


class Profiler:
    def __init__(self, model):
        import llmrun.engine.model as M
        from llmrun.kernels import ops
        from llmrun.ggml import GGMLType

        self.M, self.model = M, model
        self.time = collections.defaultdict(float)      # (kind, role, type) -> seconds
        self.calls = collections.Counter()
        self.bytes = collections.defaultdict(int)       # (kind, role, type) -> weight bytes streamed
        self.layer_time = collections.defaultdict(float)
        self.layer = -1
        self.who = {}                                   # id(PackedMatrix) -> (layer, role)
        for il, L in enumerate(model.layers):
            for role in ("qkv", "out", "gate_up", "down"):
                for pm in getattr(L, role):
                    self.who[id(pm)] = (il, role)
        for pm in model.output:
            self.who[id(pm)] = (-1, "output")
        self.who.setdefault(id(model.tok_embd), (-1, "token_embd"))
        self.attn_norm = {id(L.attn_norm): il for il, L in enumerate(model.layers)}
        self.type_names = {int(t): t.lower for t in GGMLType}
        self.orig = {name: getattr(M, name) for name in ("matmul", "matvec", "dequantize_rows")}
        self.orig_ops = ops

    def _mat(self, kind, fn):
        def timed(pm, *args, **kw):
            il, role = self.who.get(id(pm), (self.layer, "?"))
            if kind == "embd rows":
                il, role = -1, "token_embd"
            key = (kind, role, self.type_names.get(pm.src_type, pm.family))
            t = CLOCK()
            r = fn(pm, *args, **kw)
            dt = CLOCK() - t
            self.time[key] += dt
            self.calls[key] += 1
            self.bytes[key] += pm.nbytes if kind != "embd rows" else 0
            self.layer_time[il] += dt
            return r
        return timed

    def _op(self, name, fn):
        def timed(*args):
            if name == "rmsnorm" and id(args[1]) in self.attn_norm:
                self.layer = self.attn_norm[id(args[1])]
            elif name == "rmsnorm" and args[1] is self.model.output_norm:
                self.layer = -1
            key = (name, "", "f32")
            t = CLOCK()
            r = fn(*args)
            dt = CLOCK() - t
            self.time[key] += dt
            self.calls[key] += 1
            self.layer_time[self.layer] += dt
            return r
        return timed

    def install(self):
        M = self.M
        M.matmul = self._mat("matmul", self.orig["matmul"])
        M.matvec = self._mat("matvec", self.orig["matvec"])
        M.dequantize_rows = self._mat("embd rows", self.orig["dequantize_rows"])
        ops = self.orig_ops   # every public function of kernels/ops.py, whatever model.py calls
        M.ops = SimpleNamespace(**{n: (self._op(n, f) if callable(f) and not n.startswith("_") else f)
                                   for n, f in vars(ops).items()})

    def uninstall(self):
        for name, fn in self.orig.items():
            setattr(self.M, name, fn)
        self.M.ops = self.orig_ops

    def clear(self):
        self.time.clear(), self.calls.clear(), self.bytes.clear(), self.layer_time.clear()


def run_phase(model, prompt, gen):
    model.reset()
    t0 = CLOCK()
    if prompt:
        model.forward(prompt)
    t1 = CLOCK()
    for tok in gen:
        model.forward((tok,))
    return t1 - t0, CLOCK() - t1


def report(prof: Profiler, wall: float, n_tok: int, title: str, md: bool) -> str:
    rows = sorted(prof.time.items(), key=lambda kv: -kv[1])
    inside = sum(prof.time.values())
    out = [f"### {title}: {wall * 1e3:.1f} ms for {n_tok} token(s) = {n_tok / wall:.1f} tok/s "
           f"({wall / n_tok * 1e3:.2f} ms/token)", ""]
    out += ["| kernel | matrix | type | calls/token | ms/token | share | GB/s |", "|---|---|---|---|---|---|---|"]
    for (kind, role, typ), t in rows:
        gbs = prof.bytes[(kind, role, typ)] / t / 1e9 if prof.bytes[(kind, role, typ)] else None
        out.append(f"| {kind} | {role} | {typ} | {prof.calls[(kind, role, typ)] / n_tok:.3g} | "
                   f"{t / n_tok * 1e3:.3f} | {t / wall * 100:.1f}% | {'' if gbs is None else f'{gbs:.1f}'} |")
    glue = wall - inside
    out.append(f"| python + numpy glue | | | | {glue / n_tok * 1e3:.3f} | {glue / wall * 100:.1f}% | |")
    out.append("")
    n_layer = len(prof.model.layers)
    per_layer = [prof.layer_time[i] / n_tok * 1e3 for i in range(n_layer)]
    out.append(f"per layer (kernels only, ms/token): min {min(per_layer):.3f}, median "
               f"{float(np.median(per_layer)):.3f}, max {max(per_layer):.3f} (layer {int(np.argmax(per_layer))}); "
               f"outside layers (embedding, output norm + head): {prof.layer_time[-1] / n_tok * 1e3:.3f}")
    out.append("")
    return "\n".join(out) if md else "\n".join(out).replace("|", " ")


def main(argv=None) -> int:
    from llmrun.tools.bench import _use_threads
    from llmrun.gguf import GGUFReader
    from llmrun.engine.model import LlamaModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    a = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter

    _use_threads(a.threads)
    model = LlamaModel.load(GGUFReader(a.model), n_ctx=a.n_prompt + a.n_gen, n_threads=a.threads)
    threads = _use_threads(a.threads)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, model.hparams.n_vocab, a.n_prompt)]
    gen = [int(t) for t in rng.integers(0, model.hparams.n_vocab, a.n_gen)]
    mb = model.weights_nbytes / 1e6
    print(f"model {a.model.name}: {model.hparams.n_layer} layers, {mb:.0f} MB of packed weights, "
          f"threads {threads}, clock {a.clock}, load {model.load_seconds:.1f} s\n")

    run_phase(model, prompt, gen)                        # warm-up (compilation, page faults)
    plain = [run_phase(model, prompt, gen) for _ in range(2)]
    pp_plain, tg_plain = min(p for p, _ in plain), min(t for _, t in plain)
    print(f"untimed: pp{a.n_prompt} {a.n_prompt / pp_plain:.1f} tok/s, tg{a.n_gen} {a.n_gen / tg_plain:.1f} tok/s "
          f"({tg_plain / a.n_gen * 1e3:.2f} ms/token, {mb / 1e3 / (tg_plain / a.n_gen):.1f} GB/s of weights)\n")

    prof = Profiler(model)
    prof.install()
    try:
        model.reset()
        t = CLOCK()
        model.forward(prompt)
        pp = CLOCK() - t
        print(report(prof, pp, a.n_prompt, f"prefill pp{a.n_prompt}", a.markdown))
        prof.clear()
        t = CLOCK()
        for tok in gen:
            model.forward((tok,))
        tg = CLOCK() - t
        print(report(prof, tg, a.n_gen, f"decode tg{a.n_gen}", a.markdown))
    finally:
        prof.uninstall()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
