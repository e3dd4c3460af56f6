"""Test-only builders for the LLaMA relatives: tiny random checkpoints of each HF class (saved with
save_pretrained, with a tokenizer of the family's kind), and the independent float32 reference for a GGUF
file: the same transformers model holding the file's weights, dequantized by gguf-py and named through
gguf-py's own tensor map (not convert/names.py), with the converter's transforms undone by hand.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .tiny_hf import write_bpe_tokenizer, write_spm_tokenizer

# GGUF architecture written for each HF class (llama.cpp's convert_hf_to_gguf.py registrations)
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3", "Gemma2ForCausalLM": "gemma2",
             "Gemma3ForCausalLM": "gemma3"}
CONFIG_CLASS = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                "Phi3ForCausalLM": "Phi3Config", "Gemma2ForCausalLM": "Gemma2Config",
                "Gemma3ForCausalLM": "Gemma3TextConfig"}

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)

GEMMA_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 and 67890.",
    "<start_of_turn>user\nWhat is a tensor?<end_of_turn>\n<start_of_turn>model\nAn array.<end_of_turn>",
    "  leading spaces, trailing spaces  \ttabs\nnewlines\n\nand café naïve Ωμέγα 日本語 🙂",
    "def main():\n    return [x ** 2 for x in range(10)]  # code",
] * 25


def write_gemma_tokenizer(folder: Path, vocab_size: int = 500) -> int:
    """A Gemma-style SentencePiece model trained here (no dummy space prefix, byte fallback, split digits,
    turn markers as user-defined pieces), saved with transformers' GemmaTokenizer; returns its size."""
    import io
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(GEMMA_CORPUS), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<mask>"], user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    # transformers converts the SentencePiece model to its tokenizer.json (needs protobuf)
    tok = GemmaTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})  # as Gemma's
    tok.save_pretrained(folder)
    # published Gemma folders (saved by transformers 4) list the added tokens in tokenizer_config.json too,
    # which is where llama.cpp's converter reads them
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()


def write_phi3_tokenizer(folder: Path, spm_model: Path) -> int:
    """Phi-3's tokenizer: LLaMA 2's SentencePiece plus its chat tokens as added special tokens (ids from
    32000 on, in tokenizer_config.json's added_tokens_decoder and tokenizer.json); returns the vocab size."""
    n = write_spm_tokenizer(folder, spm_model)
    added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(n + i): {"content": t, "special": True, "normalized": False,
                                                "lstrip": False, "rstrip": t != "<|endoftext|>",
                                                "single_word": False} for i, t in enumerate(added)}
    cfg.update(eos_token="<|endoftext|>", add_bos_token=False,
               chat_template="{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(added)}))
    return n + len(added)


def make_tiny(folder: Path, hf_arch: str, *, tokenizer: str, spm_model: Path | None = None, seed: int = 0,
              dtype: str = "float32", **config) -> Path:
    """A random `hf_arch` model (transformers' own class) saved with save_pretrained plus a tokenizer
    ("bpe-qwen2", "spm", "gemma", "phi3"). Every weight is perturbed away from the init, norms included."""
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe-qwen2":
        n_vocab, ids = write_bpe_tokenizer(folder, pre="qwen2"), dict(bos_token_id=None, eos_token_id=2)
    elif tokenizer == "spm":
        n_vocab, ids = write_spm_tokenizer(folder, spm_model), dict(bos_token_id=1, eos_token_id=2)
    elif tokenizer == "gemma":
        n_vocab, ids = write_gemma_tokenizer(folder), dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    elif tokenizer == "phi3":
        n_vocab, ids = write_phi3_tokenizer(folder, spm_model), dict(bos_token_id=1, eos_token_id=32000)
    else:
        raise ValueError(tokenizer)
    kw = {**TINY, **ids, "vocab_size": n_vocab, **config}
    cfg = getattr(transformers, CONFIG_CLASS[hf_arch])(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, hf_arch)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def as_multimodal(text_dir: Path, out_dir: Path) -> Path:
    """A Gemma3ForConditionalGeneration-shaped folder around a Gemma3ForCausalLM checkpoint: the text
    config under text_config, the text tensors under model.language_model., and a stray vision tensor."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(text_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    top = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {**cfg, "model_type": "gemma3_text"}, "vision_config": {"model_type": "siglip_vision_model"}}
    (out_dir / "config.json").write_text(json.dumps(top))
    tensors = load_file(str(out_dir / "model.safetensors"))
    renamed = {("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else
               "model.language_model." + k[len("model."):]: v for k, v in tensors.items()}
    renamed["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
    renamed["model.multi_modal_projector.mm_input_projection_weight"] = np.zeros((4, 4), np.float32)
    save_file(renamed, str(out_dir / "model.safetensors"))
    return out_dir


def hf_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_from_gguf(hf_dir: Path, gguf_path: Path):
    """transformers' model of `hf_dir` holding the weights stored in `gguf_path` (dequantized by gguf-py),
    mapped back through gguf-py's tensor names: Gemma's norms minus 1, LLaMA's Q/K rows un-permuted."""
    import gguf
    import torch

    model = hf_model(hf_dir)
    cfg = model.config
    r = gguf.GGUFReader(str(gguf_path))
    arch = r.fields["general.architecture"].contents()
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
               .reshape([int(s) for s in reversed(t.shape)]) for t in r.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    sd = {}
    for hf, p in model.state_dict().items():
        if hf == "lm_head.weight" and "output.weight" not in tensors:
            continue   # tied
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        a = tensors[g]
        if arch.startswith("gemma") and hf.endswith("norm.weight"):
            a = a - 1.0
        if arch == "llama" and hf.endswith("self_attn.q_proj.weight"):
            a = _unpermute(a, cfg.num_attention_heads)
        elif arch == "llama" and hf.endswith("self_attn.k_proj.weight"):
            a = _unpermute(a, cfg.num_key_value_heads)
        assert tuple(a.shape) == tuple(p.shape), hf
        sd[hf] = torch.from_numpy(np.ascontiguousarray(a))
    missing = model.load_state_dict(sd, strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing
    if "output.weight" not in tensors:
        model.tie_weights()
    return model
