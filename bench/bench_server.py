"""Continuous batching in `llmrun serve`: aggregate decode tokens/s with K concurrent streams vs one, and the
time to first token of a request whose prompt prefix is already cached.

    python bench/bench_server.py                      # default model, 1 vs 4 streams, 3 repetitions
    python bench/bench_server.py --streams 1 2 4 8 -n 64 --json

The server runs in its own process (`llmrun serve --parallel max(streams)`), as a user would run it; the
streams are real HTTP clients (/v1/completions, streamed). Decode tok/s of a run = the tokens generated
after each stream's first one, summed over the streams, divided by the time from the first stream's first
token to the last stream's last token (prompt processing is excluded; the prompts are short). Each stream
gets its own prompt and seed. The median of the repetitions is reported.

TTFT: a ~500-token prefix (a system prompt) followed by a question, measured (1) cold, (2) with the prefix
cached in a slot and a different question after it, and (3) for the question alone on a fresh slot: the
shared-prefix TTFT should cost about as much as (3), i.e. only its new tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.server import ServerProcess  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Once upon a time, in a small village by the sea,", "The history of the printing press begins",
           "In the year 2150, the first colony on Mars", "The recipe for a perfect loaf of bread starts with",
           "Deep in the forest, an old woman kept a secret:", "The rules of chess are simple to learn but",
           "When the train stopped in the middle of nowhere,", "Scientists were surprised to discover that"]


def stream_completion(url: str, prompt: str, n: int, seed: int, out: dict) -> None:
    """One streamed completion; records the arrival time of every text chunk and the token count."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.8, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    times, tokens = [], 0
    with httpx.Client(base_url=url, timeout=600) as c, c.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    out.update(times=times, tokens=tokens)


def decode_run(url: str, k: int, n: int, rep: int) -> dict:
    results = [dict() for _ in range(k)]
    threads = [threading.Thread(target=stream_completion,
                                args=(url, PROMPTS[i % len(PROMPTS)], n, 1000 * rep + i, results[i]))
               for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(r["times"][0] for r in results)
    last = max(r["times"][-1] for r in results)
    after_first = sum(r["tokens"] - 1 for r in results)
    return {"streams": k, "tokens": sum(r["tokens"] for r in results), "seconds": last - first,
            "tps": after_first / (last - first), "per_stream_tokens": [r["tokens"] for r in results]}


def ttft(url: str, messages: list[dict]) -> float:
    body = {"messages": messages, "max_tokens": 1, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - t0
    return time.perf_counter() - t0


def ttft_runs(url: str, reps: int) -> dict:
    system = {"role": "system", "content": " ".join(
        f"Rule {i}: answer politely, briefly and truthfully, and cite the rule you follow." for i in range(1, 31))}
    cold, warm, alone = [], [], []
    for rep in range(reps):
        tag = f" (run {rep})"            # a prefix no slot holds yet
        prefix = {"role": "system", "content": system["content"] + tag}
        cold.append(ttft(url, [prefix, {"role": "user", "content": "What is the capital of France?"}]))
        warm.append(ttft(url, [prefix, {"role": "user", "content": "Name three primary colours, please."}]))
        alone.append(ttft(url, [{"role": "user", "content": f"Name three primary colours, please{tag}."}]))
    return {"cold_s": statistics.median(cold), "cached_prefix_s": statistics.median(warm),
            "new_tokens_only_s": statistics.median(alone)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("-n", "--n-gen", type=int, default=64, help="tokens per stream")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    parallel = max(args.streams)
    with ServerProcess(args.model, "--parallel", str(parallel), "--ctx", "2048",
                       "--threads", str(args.threads)) as srv:   # the last --threads given wins
        decode_run(srv.url, parallel, 8, 99)                      # warm-up: every kernel shape compiled
        rows = []
        for k in args.streams:
            runs = [decode_run(srv.url, k, args.n_gen, rep) for rep in range(args.repetitions)]
            rows.append({**runs[0], "tps": statistics.median(r["tps"] for r in runs),
                         "all_tps": [round(r["tps"], 1) for r in runs]})
        ttfts = ttft_runs(srv.url, args.repetitions)
    base = rows[0]["tps"]
    for row in rows:
        row["ratio"] = row["tps"] / base
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"decode": rows, "ttft": ttfts, "load_avg_1m": load}, indent=1))
        return 0
    print(f"llmrun serve, {Path(args.model).name}, {args.threads} threads, {args.n_gen} tokens per stream, "
          f"median of {args.repetitions} (load average {load:.1f})")
    print("| streams | aggregate decode tok/s | vs 1 stream | runs |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['streams']} | {row['tps']:.1f} | {row['ratio']:.2f}x | {row['all_tps']} |")
    print(f"TTFT: cold {ttfts['cold_s'] * 1e3:.0f} ms, shared cached prefix {ttfts['cached_prefix_s'] * 1e3:.0f} ms, "
          f"new tokens alone {ttfts['new_tokens_only_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
