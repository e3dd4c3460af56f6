"""`make bench`: llmrun and llama.cpp (through llama-cpp-python) side by side on the same GGUF files.

    python bench/bench_compare.py            # all cases (builds the random TinyLlama models once)
    python bench/bench_compare.py --quick    # only the default SmolLM2 model
    python bench/bench_compare.py --case q4_0 --case smollm2 -p 128 -n 32 -r 3

Both engines measure the same thing the same way (see llmrun/tools/bench.py): prefill = one batched evaluation of
n_prompt random tokens from an empty cache, decode = n_gen single-token evaluations after it, a warm-up
pass first, the median of the repetitions reported. Each engine runs in its own worker process (their
OpenMP thread pools would otherwise fight over the two cores), and the timed passes alternate between
the two engines, so background load from the shared machine hits both alike; compare the ratios.

The TinyLlama-1.1B-shaped models are random-weight checkpoints (bench/make_random_checkpoint.py) converted
with `llmrun convert`, cached under models/bench/ and built only when missing.

Honest by default: each engine runs with its own default settings. llama.cpp's worker gets exactly the
environment the benchmark was started with (nothing llmrun sets for itself leaks into it); llmrun runs as
shipped. Any other policy (`--omp-wait`) is a flag and is printed in the table's header. Before each case
the load average is checked (a busy machine is waited for, then reported), and the machine's measured read
bandwidth gives each case's decode ceiling (weight bytes per token / GB/s).
"""
from __future__ import annotations

# First: it keeps the user's environment from before anything can import llmrun (the llama.cpp worker's).
from bench_workers import USER_ENV as _USER_ENV, Worker, llamacpp_available

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_machine import ForeignLoad, machine_line, wait_for_quiet, weight_bytes_per_token

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"
BENCH_DIR = MODELS_DIR / "bench"
DEFAULT_MODEL = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = MODELS_DIR / "gemma-3-270m-q4_k_m.gguf"   # `make gemma3`
SHARED_DIR = Path(os.environ.get("LLMRUN_SHARED", REPO_ROOT.parent / "shared"))
TOKENIZER_MODEL = SHARED_DIR / "fixtures" / "llama2-tokenizer.model"
RANDOM_CKPT = BENCH_DIR / "tinyllama-1.1b-random-hf"

# Seconds of quiet between two timed passes: OpenMP / ggml worker threads spin for a while after their
# work is done, and must not steal the cores from the other engine's next pass.
SETTLE_S = 0.3


@dataclass(frozen=True)
class Case:
    name: str
    model: str        # "tinyllama" (random 1.1B, built on demand), "smollm2" (the default model) or "gemma3"
    qtype: str
    threads: int

    def path(self) -> Path:
        if self.model == "smollm2":
            return DEFAULT_MODEL
        if self.model == "gemma3":
            return GEMMA3_MODEL
        return BENCH_DIR / f"tinyllama-1.1b-random.{self.qtype}.gguf"


CASES = [
    Case("tinyllama-q4_0-t1", "tinyllama", "q4_0", 1),
    Case("tinyllama-q4_0-t2", "tinyllama", "q4_0", 2),
    Case("tinyllama-q8_0-t2", "tinyllama", "q8_0", 2),
    Case("tinyllama-q4_k_m-t1", "tinyllama", "q4_k_m", 1),
    Case("tinyllama-q4_k_m-t2", "tinyllama", "q4_k_m", 2),
    Case("tinyllama-q5_k_m-t1", "tinyllama", "q5_k_m", 1),
    Case("tinyllama-q5_k_m-t2", "tinyllama", "q5_k_m", 2),
    Case("smollm2-q4_1-t2", "smollm2", "q4_1", 2),
    Case("gemma3-270m-q4_k_m-t1", "gemma3", "q4_k_m", 1),
    Case("gemma3-270m-q4_k_m-t2", "gemma3", "q4_k_m", 2),
]


# ----------------------------------------------------------------------------------------------- models
def _run(cmd: list[str], what: str) -> None:
    print(f"[bench] {what}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode})")
    print(f"[bench] {what}: done in {time.perf_counter() - t:.0f} s", flush=True)


def ensure_model(case: Case) -> Path:
    """The case's GGUF file, converted from the random checkpoint first if it is not cached yet."""
    path = case.path()
    if path.exists():
        return path
    if case.model in ("smollm2", "gemma3"):
        raise RuntimeError(f"{path} is missing: run `make {'model' if case.model == 'smollm2' else 'gemma3'}`")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if not (RANDOM_CKPT / "config.json").exists():
        if not TOKENIZER_MODEL.exists():
            raise RuntimeError(f"{TOKENIZER_MODEL} is missing (shared/ must sit beside the repo)")
        _run([sys.executable, str(REPO_ROOT / "bench" / "make_random_checkpoint.py"), str(RANDOM_CKPT),
              "--tokenizer-model", str(TOKENIZER_MODEL)], "random TinyLlama checkpoint")
    _run([sys.executable, "-m", "llmrun.cli", "convert", str(RANDOM_CKPT), "-o", str(path),
          "--type", case.qtype], f"llmrun convert --type {case.qtype}")
    return path


# ----------------------------------------------------------------------------------------------- measure
def measure_case(case: Case, engines: list[str], n_prompt: int, n_gen: int, repetitions: int, seed: int = 0,
                 omp_wait: str | None = None):
    """{engine: {"pp_tps", "tg_tps", "pp_runs", "tg_runs", "load_s"} or {"error": msg}}."""
    import numpy as np

    path = ensure_model(case)
    n_ctx = max(n_prompt + n_gen, 16)
    workers, out = {}, {}
    for eng in engines:
        try:
            workers[eng] = Worker(eng, path, case.threads, n_ctx, omp_wait)
        except Exception as e:  # one engine failing must not hide the other one's numbers
            out[eng] = {"error": str(e)}
    try:
        if not workers:
            return out
        n_vocab = min(w.info["n_vocab"] for w in workers.values())
        rng = np.random.default_rng(seed)
        prompt = [int(t) for t in rng.integers(0, n_vocab, n_prompt)]
        gen = [int(t) for t in rng.integers(0, n_vocab, n_gen)]
        runs = {eng: [] for eng in workers}
        for rep in range(-1, repetitions):          # rep -1 is the warm-up pass, not recorded
            order = list(workers) if rep % 2 == 0 else list(reversed(workers))
            for eng in order:
                if eng in out:
                    continue
                try:
                    times = workers[eng].timed_pass(prompt, gen)
                except Exception as e:
                    out[eng] = {"error": str(e)}
                    continue
                if rep >= 0:
                    runs[eng].append(times)
                time.sleep(SETTLE_S)
        for eng, r in runs.items():
            if eng in out:
                continue
            pp = [n_prompt / t[0] for t in r] if n_prompt else []
            tg = [n_gen / t[1] for t in r] if n_gen else []
            pp_cpu = [n_prompt / t[2] for t in r if t[2] > 0] if n_prompt else []
            tg_cpu = [n_gen / t[3] for t in r if t[3] > 0] if n_gen else []
            out[eng] = {"pp_tps": statistics.median(pp) if pp else None,
                        "tg_tps": statistics.median(tg) if tg else None,
                        "pp_runs": pp, "tg_runs": tg,
                        # tokens per CPU-second of the worker (all its threads; includes spin-waiting)
                        "pp_tps_cpu": statistics.median(pp_cpu) if pp_cpu else None,
                        "tg_tps_cpu": statistics.median(tg_cpu) if tg_cpu else None,
                        "load_s": workers[eng].info["load_s"]}
    finally:
        for w in workers.values():
            w.close()
    return out


def _geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def format_table(rows, have_llamacpp: bool, cpu: bool = False) -> str:
    """The comparison table; cpu=True shows tokens per CPU-second instead of per wall-second."""
    pp_key, tg_key = ("pp_tps_cpu", "tg_tps_cpu") if cpu else ("pp_tps", "tg_tps")
    head = f"{'case':<22} {'thr':>3} {'llmrun pp':>10} {'llmrun tg':>10}"
    if have_llamacpp:
        head += f" {'llama.cpp pp':>12} {'llama.cpp tg':>12} {'pp ratio':>9} {'tg ratio':>9}"
    width = len(head)
    if not cpu:   # the machine's side: decode ceiling from read bandwidth, cores other processes took
        head += f" {'tg ceiling':>10} {'llmrun/ceil':>11} {'others':>6}"
    lines = [head, "-" * len(head)]
    pp_ratios, tg_ratios = [], []
    for case, res in rows:
        ours, ref = res.get("llmrun", {}), res.get("llama.cpp", {})
        line = f"{case.name:<22} {case.threads:>3} {_fmt(ours.get(pp_key)):>10} {_fmt(ours.get(tg_key)):>10}"
        if have_llamacpp:
            ratios = []
            for key, acc in ((pp_key, pp_ratios), (tg_key, tg_ratios)):
                a, b = ours.get(key), ref.get(key)
                ratio = a / b if a and b else None
                if ratio:
                    acc.append(ratio)
                ratios.append(ratio)
            line += (f" {_fmt(ref.get(pp_key)):>12} {_fmt(ref.get(tg_key)):>12}"
                     f" {_fmt(ratios[0], '.3f'):>9} {_fmt(ratios[1], '.3f'):>9}")
        if not cpu:
            mach = res.get("machine", {})
            ceil, tg = mach.get("tg_ceiling"), ours.get(tg_key)
            line += (f" {_fmt(ceil):>10} {_fmt(tg / ceil if tg and ceil else None, '.0%'):>11}"
                     f" {_fmt(mach.get('other_cores'), '.2f'):>6}")
        lines.append(line)
        for eng, r in res.items():
            if eng != "machine" and "error" in r:
                lines.append(f"  ! {eng}: {r['error']}")
    if have_llamacpp:
        gm = f"{'geometric mean (llmrun / llama.cpp)':<49}"
        lines.append("-" * len(head))
        lines.append(f"{gm:<{width - 20}} {_fmt(_geomean(pp_ratios), '.3f'):>9} "
                     f"{_fmt(_geomean(tg_ratios), '.3f'):>9}")
    return "\n".join(lines)


def measure_bandwidth(threads: list[int]) -> dict[int, float]:
    """GB/s per thread count, measured in a fresh process (bench/bandwidth.py) under the user's environment."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bandwidth.py"), "--json",
                           "--threads", ",".join(map(str, sorted(set(threads))))],
                          capture_output=True, text=True, env=_USER_ENV, cwd=REPO_ROOT)
    if proc.returncode != 0:
        print(f"[bench] bandwidth measurement failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return {}
    return {int(k): float(v) for k, v in json.loads(proc.stdout).items()}


def select_cases(patterns: list[str] | None, quick: bool) -> list[Case]:
    if quick:
        return [c for c in CASES if c.model == "smollm2"]
    if not patterns:
        return list(CASES)
    chosen = [c for c in CASES if any(p in c.name for p in patterns)]
    if not chosen:
        raise SystemExit(f"no case matches {patterns}; cases: {', '.join(c.name for c in CASES)}")
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/bench_compare.py",
                                 description="llmrun vs llama.cpp prefill/decode throughput, side by side")
    ap.add_argument("--quick", action="store_true", help="only the default SmolLM2 model")
    ap.add_argument("--case", action="append", metavar="SUBSTRING",
                    help="run the cases whose name contains this (repeatable); see --list")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--llmrun-only", action="store_true", help="do not run llama.cpp")
    ap.add_argument("--omp-wait", choices=("passive", "active"), default=None,
                    help="force OMP_WAIT_POLICY on both engines (not their defaults; labelled in the output). "
                         "Default: each engine as its users run it")
    ap.add_argument("--max-load", type=float, default=0.5,
                    help="1-minute load average that counts as quiet (default 0.5)")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="seconds to wait for a quiet machine before timing (default 120)")
    ap.add_argument("--cpu-time", action="store_true", help="also print the table in tokens per CPU-second")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the raw results as JSON")
    a = ap.parse_args(argv)
    if a.list:
        for c in CASES:
            print(f"{c.name:<22} {c.path()}{'' if c.path().exists() else '  (built on first use)'}")
        return 0
    if a.n_prompt < 0 or a.n_gen < 0 or a.n_prompt + a.n_gen == 0 or a.repetitions < 1:
        ap.error("need -p >= 0, -n >= 0, -p + -n > 0 and -r >= 1")
    cases = select_cases(a.case, a.quick)
    have_llamacpp = not a.llmrun_only and llamacpp_available()
    if not a.llmrun_only and not have_llamacpp:
        print("llama-cpp-python is not installed (`make install-bench`): printing llmrun numbers only.")
    engines = ["llmrun"] + (["llama.cpp"] if have_llamacpp else [])

    load = wait_for_quiet(a.max_load, a.quiet_wait)
    bandwidth = measure_bandwidth([c.threads for c in cases])
    print(machine_line())
    policy = (f"OMP_WAIT_POLICY={a.omp_wait.upper()} FORCED on both engines (not their defaults)" if a.omp_wait
              else "both engines at their default settings")
    print(f"pp{a.n_prompt} / tg{a.n_gen}, median of {a.repetitions} after 1 warm-up, tokens/s, ratio = "
          f"llmrun / llama.cpp, {policy}", flush=True)
    quiet = "quiet" if load <= a.max_load else "BUSY: these numbers are not a quiet-machine measurement"
    print(f"load average before timing: {load:.2f} ({quiet}); read bandwidth: "
          + (", ".join(f"{t} thr {g:.1f} GB/s" for t, g in sorted(bandwidth.items())) or "not measured"), flush=True)
    rows = []
    for case in cases:
        print(f"[bench] {case.name} ...", flush=True)
        foreign = ForeignLoad()
        try:
            res = measure_case(case, engines, a.n_prompt, a.n_gen, a.repetitions,
                               omp_wait=a.omp_wait.upper() if a.omp_wait else None)
        except Exception as e:
            res = {"llmrun": {"error": str(e)}}
        res["machine"] = {"other_cores": foreign.cores()}
        if case.threads in bandwidth and case.path().exists():
            res["machine"]["tg_ceiling"] = bandwidth[case.threads] * 1e9 / weight_bytes_per_token(case.path())
        rows.append((case, res))
    print()
    print(format_table(rows, have_llamacpp))
    if a.cpu_time:
        print("\nthe same, in tokens per CPU-second of each engine's process (robust to a busy machine at 1 "
              "thread; at 2 threads it counts spin-waiting too):")
        print(format_table(rows, have_llamacpp, cpu=True))
    if a.json:
        a.json.write_text(json.dumps({
            "machine": machine_line(), "omp_wait": a.omp_wait, "load_before": load,
            "bandwidth_gbs": bandwidth, "n_prompt": a.n_prompt, "n_gen": a.n_gen, "repetitions": a.repetitions,
            "cases": [{"case": c.name, "model": str(c.path()), "threads": c.threads, **res} for c, res in rows],
        }, indent=2) + "\n")
    failed = any("error" in r for _, res in rows for eng, r in res.items() if eng != "machine")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
