"""Decode (and prefill) speed of each supported architecture against llama, same shapes and weight type.

For every HF class a random checkpoint of one common shape is built with transformers (the dev extra),
converted with `llmrun convert --type T`, and measured with `llmrun bench`'s passes. Decode streams every
weight once per token (but only one row of an untied token_embd), so the comparison is per streamed
byte: tg tok/s x streamed MiB, relative to llama's.

    python bench/bench_relatives.py --tokenizer-model ../shared/fixtures/llama2-tokenizer.model [--type q4_0]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=4096)
CLASSES = {   # HF class -> (config class, extra config)
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": 4096}),
    "Phi3ForCausalLM": ("Phi3Config", {"pad_token_id": 0}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"query_pre_attn_scalar": 64}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"query_pre_attn_scalar": 64, "sliding_window": 512}),
}


def build(hf_class: str, folder: Path, tokenizer_model: Path) -> Path:
    import json

    import torch
    import transformers

    cfg_class, extra = CLASSES[hf_class]
    shape = {k: v for k, v in SHAPE.items() if not (hf_class == "Phi3ForCausalLM" and k == "head_dim")}
    cfg = getattr(transformers, cfg_class)(**shape, **extra, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.no_grad():
        model = getattr(transformers, hf_class)(cfg)
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer-model", type=Path, required=True)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--classes", nargs="*", default=list(CLASSES))
    a = ap.parse_args(argv)

    from llmrun.convert import convert_checkpoint
    from llmrun.engine.model import LlamaModel
    from llmrun.gguf import GGUFReader
    from llmrun.tools.bench import bench_model

    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for hf_class in a.classes:
            d = build(hf_class, Path(tmp) / hf_class, a.tokenizer_model)
            out = convert_checkpoint(d, Path(tmp) / f"{hf_class}.gguf", out_type=a.type)
            shutil.rmtree(d)
            reader = GGUFReader(out)
            streamed = sum(ti.nbytes for n, ti in reader.tensors.items()
                           if n != "token_embd.weight" or "output.weight" not in reader.tensors)
            models[hf_class] = (LlamaModel.load(reader, n_ctx=160, n_threads=a.threads), streamed / 2**20)
            bench_model(models[hf_class][0], repetitions=1)    # warm-up: numba compiles or loads its cache
        # interleaved rounds, best of each: the machine is shared, and contention only ever slows a run down
        best = {c: (0.0, 0.0) for c in models}
        for _ in range(a.repetitions):
            for hf_class, (model, _) in models.items():
                pp, tg, _ = bench_model(model, repetitions=1, warmup=False)
                best[hf_class] = (max(best[hf_class][0], pp[0]), max(best[hf_class][1], tg[0]))
    base = best["LlamaForCausalLM"][1] * models["LlamaForCausalLM"][1] if "LlamaForCausalLM" in best else None
    print(f"{a.type}, threads {a.threads or 'all'}, best of {a.repetitions} interleaved rounds (pp128, tg32)")
    print("| class | streamed MiB | pp tok/s | tg tok/s | tg MiB/s | vs llama (per byte) |")
    print("|---|---|---|---|---|---|")
    for hf_class, (pp, tg) in best.items():
        mib = models[hf_class][1]
        rel = f"{tg * mib / base:.2f}" if base else "-"
        print(f"| {hf_class} | {mib:.0f} | {pp:.1f} | {tg:.1f} | {tg * mib:.0f} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
