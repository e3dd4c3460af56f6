"""Decode speed under a JSON schema vs unconstrained, through the public API (the cost of grammar masks).

    python bench/bench_grammar.py                  # default model, 64 tokens, 5 repetitions
    python bench/bench_grammar.py MODEL -n 96 -r 7

Both runs generate from the same chat prompt with the same sampler; the constrained one asks for
`response_format={"type": "json_schema", ...}` with a schema whose long string keeps the model writing for
all n tokens. Decode tok/s = generated tokens / generation time (`Llama.last_timings`), so the prompt does
not count. A warm-up pass of each comes first (llguidance builds its lexer states lazily, the vocabulary
bridge is built once per tokenizer), then the timed passes alternate between the two so background load on a
shared machine hits both alike; the medians and their ratio are printed. The mask time alone (the matcher's
`allowed` + `accept` per token) is measured too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "story": {"type": "string", "minLength": 2000},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["title", "story", "rating"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Write a long story about a dragon and a lighthouse, as JSON with a "
                                        "title, the story and a rating."}]


def decode_rate(llm, n_gen: int, constrained: bool) -> float:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}} \
        if constrained else {}
    # EOS banned in the unconstrained run so that it too generates all n_gen tokens
    bias = {} if constrained else {t: -100.0 for t in llm.tokenizer.eog_ids}
    llm.create_chat_completion(MESSAGES, max_tokens=n_gen, temperature=0.7, seed=1, logit_bias=bias, **extra)
    t = llm.last_timings
    return t["n_gen"] / t["t_gen"]


def mask_cost(llm, n_gen: int) -> float:
    """Microseconds per token spent in the matcher (allowed + accept) on a greedy walk under the schema."""
    import numpy as np

    from llmrun.text.grammar import Grammar
    matcher = Grammar.from_json_schema(SCHEMA).matcher(llm.tokenizer)
    rng = np.random.default_rng(0)
    spent = 0.0
    for _ in range(n_gen):
        logits = rng.standard_normal(llm.n_vocab()).astype(np.float32)
        t0 = time.perf_counter()
        allowed = matcher.allowed()
        token = int(np.argmax(np.where(allowed, logits, -np.inf)))
        matcher.accept(token)
        spent += time.perf_counter() - t0
        if matcher.is_done:
            break
    return spent / n_gen * 1e6


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmrun import Llama
    from llmrun.cli.paths import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: the default model)")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    llm = Llama(resolve_model(args.model), n_ctx=1024, n_threads=args.threads)
    for constrained in (False, True):
        decode_rate(llm, args.n_gen, constrained)          # warm-up
    free, bound = [], []
    for _ in range(args.repetitions):
        free.append(decode_rate(llm, args.n_gen, False))
        bound.append(decode_rate(llm, args.n_gen, True))
    f, b = statistics.median(free), statistics.median(bound)
    print(f"model {Path(llm.model_path).name}, {args.n_gen} tokens, median of {args.repetitions}")
    print(f"unconstrained decode   {f:7.1f} tok/s")
    print(f"JSON schema decode     {b:7.1f} tok/s")
    print(f"ratio                  {b / f:7.3f}")
    print(f"mask cost              {mask_cost(llm, args.n_gen):7.1f} us/token (allowed + accept)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
