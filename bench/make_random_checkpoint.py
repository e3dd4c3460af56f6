"""Write a random-weight Hugging Face LLaMA checkpoint (f16 safetensors + config + SentencePiece tokenizer).

Benchmarks only need the *shapes* of a real model: the weights are N(0, 0.02) noise, which is enough for
quantization and for every kernel to do the same work as on trained weights. Default shapes are
TinyLlama-1.1B's; every dimension can be changed for tiny test models.

    python bench/make_random_checkpoint.py OUT_DIR --tokenizer-model llama2-tokenizer.model
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

TINYLLAMA_SHAPES = dict(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000)


def _config(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "initializer_range": 0.02,
        "intermediate_size": n_ff,
        "max_position_embeddings": n_ctx,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_head_kv,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": n_vocab,
    }


def _tensor_shapes(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab):
    """HF tensor names and (out, in) shapes of a LlamaForCausalLM, in the order HF saves them."""
    hd = n_embd // n_head
    yield "model.embed_tokens.weight", (n_vocab, n_embd)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (n_embd,)
        yield p + "self_attn.q_proj.weight", (n_head * hd, n_embd)
        yield p + "self_attn.k_proj.weight", (n_head_kv * hd, n_embd)
        yield p + "self_attn.v_proj.weight", (n_head_kv * hd, n_embd)
        yield p + "self_attn.o_proj.weight", (n_embd, n_head * hd)
        yield p + "post_attention_layernorm.weight", (n_embd,)
        yield p + "mlp.gate_proj.weight", (n_ff, n_embd)
        yield p + "mlp.up_proj.weight", (n_ff, n_embd)
        yield p + "mlp.down_proj.weight", (n_embd, n_ff)
    yield "model.norm.weight", (n_embd,)
    yield "lm_head.weight", (n_vocab, n_embd)


def write_random_checkpoint(out_dir: Path, tokenizer_model: Path, *, n_layer: int, n_embd: int, n_ff: int,
                            n_head: int, n_head_kv: int, n_vocab: int, n_ctx: int = 2048, seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError(f"bad shapes: n_embd {n_embd}, n_head {n_head}, n_head_kv {n_head_kv}")
    # Build in a sibling temp folder and rename at the end: a half-written checkpoint is never left behind.
    tmp = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng(seed)
        tensors = {}
        for name, shape in _tensor_shapes(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab):
            if len(shape) == 1:  # RMS norm gains: ones, like a freshly initialised model
                tensors[name] = np.ones(shape, dtype=np.float16)
            else:
                w = rng.standard_normal(shape, dtype=np.float32)
                w *= 0.02
                tensors[name] = w.astype(np.float16)
                del w
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        cfg = _config(n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "max_length": n_ctx}, indent=2) + "\n")
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": None, "model_max_length": n_ctx, "legacy": False,
            "tokenizer_class": "LlamaTokenizer"}, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--tokenizer-model", type=Path, required=True, help="SentencePiece model (LLaMA-2's)")
    for key, value in TINYLLAMA_SHAPES.items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=value)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_random_checkpoint(a.out_dir, a.tokenizer_model, n_layer=a.n_layer, n_embd=a.n_embd, n_ff=a.n_ff,
                            n_head=a.n_head, n_head_kv=a.n_head_kv, n_vocab=a.n_vocab, n_ctx=a.n_ctx, seed=a.seed)
    print(a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
