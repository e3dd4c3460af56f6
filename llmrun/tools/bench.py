"""Throughput of a GGUF model on this machine: prefill (pp) and decode (tg) tokens per second.

Measured the way llama-bench does it, so the numbers compare with llama.cpp's:
- pp: ONE batched forward of n_prompt tokens into an empty KV cache;
- tg: n_gen single-token forwards right after that prompt (no sampling, the ids are fixed in advance);
- token ids are random (a tokenizer is not needed and the kernels do the same work for any id);
- a full warm-up pass first, so Numba compilation, page faults of the mmap and cold caches are not measured;
- the median over the repetitions is reported (the machine is shared, single runs are noisy).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LlmrunError


@dataclass
class BenchResult:
    model: str
    n_prompt: int
    n_gen: int
    threads: int
    repetitions: int
    pp_tps: float | None                 # median prefill tokens/s (None when n_prompt == 0)
    tg_tps: float | None                 # median decode tokens/s (None when n_gen == 0)
    pp_tps_runs: list[float] = field(default_factory=list)
    tg_tps_runs: list[float] = field(default_factory=list)
    load_s: float = 0.0                  # LlamaModel.load time (includes repacking weights)
    warmup_s: float = 0.0                # first pass (includes Numba compile or cache load)
    model_type: str | None = None        # general.file_type name, e.g. "MOSTLY_Q4_0"
    model_size: int = 0                  # bytes of tensor data
    n_params: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def random_tokens(n: int, n_vocab: int, rng: np.random.Generator) -> list[int]:
    return [int(t) for t in rng.integers(0, n_vocab, size=n)]


def _time_pass(model, prompt: Sequence[int], gen: Sequence[int]) -> tuple[float, float]:
    """One pp + tg pass from an empty cache; seconds spent in each phase."""
    model.reset()
    t0 = time.perf_counter()
    if prompt:
        model.forward(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        model.forward((tok,))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _tps(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _check_counts(n_prompt: int, n_gen: int, repetitions: int) -> None:
    if n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise LlmrunError(f"bench: need n_prompt >= 0, n_gen >= 0 and at least one token (got {n_prompt}, {n_gen})")
    if repetitions < 1:
        raise LlmrunError(f"bench: repetitions must be >= 1 (got {repetitions})")


def bench_model(model, *, n_prompt: int = 128, n_gen: int = 32, repetitions: int = 3, seed: int = 0,
                warmup: bool = True) -> tuple[list[float], list[float], float]:
    """Run the passes on a loaded LlamaModel. Returns (pp tok/s per run, tg tok/s per run, warm-up seconds)."""
    _check_counts(n_prompt, n_gen, repetitions)
    if n_prompt + n_gen > model.n_ctx:
        raise LlmrunError(f"bench: {n_prompt} + {n_gen} tokens do not fit in the context of {model.n_ctx}")
    rng = np.random.default_rng(seed)
    n_vocab = model.hparams.n_vocab
    prompt = random_tokens(n_prompt, n_vocab, rng)
    gen = random_tokens(n_gen, n_vocab, rng)
    warmup_s = 0.0
    if warmup:
        t = time.perf_counter()
        _time_pass(model, prompt, gen)
        warmup_s = time.perf_counter() - t
    pp, tg = [], []
    for _ in range(repetitions):
        pp_s, tg_s = _time_pass(model, prompt, gen)
        pp.append(_tps(n_prompt, pp_s))
        tg.append(_tps(n_gen, tg_s))
    model.reset()
    return pp, tg, warmup_s


def _file_type_name(value) -> str | None:
    from ..gguf import LlamaFileType
    try:
        return LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return None


def _use_threads(requested: int | None) -> int:
    """Pin Numba's parallel loops to `requested` threads (the engine does too; this makes sure the bench
    measures what it reports) and return the count in force."""
    import numba
    if requested is not None:
        limit = numba.config.NUMBA_NUM_THREADS
        if not 1 <= requested <= limit:
            raise LlmrunError(f"bench: threads must be between 1 and {limit} (got {requested})")
        numba.set_num_threads(requested)
    return int(numba.get_num_threads())


def bench_file(path: str | os.PathLike, *, n_prompt: int = 128, n_gen: int = 32, threads: int | None = None,
               repetitions: int = 3, seed: int = 0) -> BenchResult:
    """Load a GGUF model and measure it (see the module docstring)."""
    from ..gguf import GGUFReader
    from ..engine.model import LlamaModel

    _check_counts(n_prompt, n_gen, repetitions)  # validate before the (slow) load
    _use_threads(threads)
    path = Path(path)
    reader = GGUFReader(path)
    t = time.perf_counter()
    # A context just big enough: attention cost then matches llama.cpp's for the same token counts.
    model = LlamaModel.load(reader, n_ctx=max(n_prompt + n_gen, 16), n_threads=threads)
    load_s = time.perf_counter() - t
    n_threads = _use_threads(threads)
    pp, tg, warmup_s = bench_model(model, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, seed=seed)
    return BenchResult(
        model=str(path), n_prompt=n_prompt, n_gen=n_gen, threads=n_threads,
        repetitions=repetitions,
        pp_tps=statistics.median(pp) if n_prompt else None,
        tg_tps=statistics.median(tg) if n_gen else None,
        pp_tps_runs=pp if n_prompt else [], tg_tps_runs=tg if n_gen else [],
        load_s=load_s, warmup_s=warmup_s,
        model_type=_file_type_name(reader.get("general.file_type")),
        model_size=sum(ti.nbytes for ti in reader.tensors.values()),
        n_params=sum(ti.n_elements for ti in reader.tensors.values()),
    )


def _spread(runs: list[float]) -> str:
    return f" ± {statistics.stdev(runs):.2f}" if len(runs) > 1 else ""


def format_result(r: BenchResult) -> str:
    """A small llama-bench-like table."""
    size = f"{r.model_size / 2**20:.1f} MiB" if r.model_size else "?"
    params = f"{r.n_params / 1e6:.1f} M params" if r.n_params else "?"
    lines = [f"model: {r.model} ({r.model_type or 'unknown type'}, {params}, {size})",
             f"threads: {r.threads}, repetitions: {r.repetitions}, load {r.load_s:.2f} s, "
             f"warm-up {r.warmup_s:.2f} s",
             f"{'test':>8}  {'tokens/s':>16}"]
    if r.pp_tps is not None:
        lines.append(f"{'pp' + str(r.n_prompt):>8}  {r.pp_tps:>9.2f}{_spread(r.pp_tps_runs)}")
    if r.tg_tps is not None:
        lines.append(f"{'tg' + str(r.n_gen):>8}  {r.tg_tps:>9.2f}{_spread(r.tg_tps_runs)}")
    return "\n".join(lines)
