"""Test-only builders: tiny random LLaMA checkpoints (transformers save_pretrained) and PEFT LoRA adapters
trained for a few optimizer steps (so lora_B != 0), plus the independent references the converter tests use
(merged HF models, the Q/K permutation written out index by index)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello, llmrun. Converting LoRA adapters into one GGUF file.",
    "def main():\n    return 42  # code, tabs\tand spaces   here",
    "Numbers 123 4567 89, accents café naïve, emoji 🙂 and 日本語.",
    "<|im_start|>user\nWhat is a tensor?<|im_end|>\n<|im_start|>assistant\nAn array.<|im_end|>",
] * 20


def write_spm_tokenizer(folder: Path, spm_model: Path) -> int:
    """Copy a SentencePiece model in as tokenizer.model; returns its vocabulary size."""
    import sentencepiece as spm
    shutil.copy(spm_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"}))
    return spm.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()


PRE_REGEXES = {   # published tokenizer.json Split regexes: Llama 3's, and Qwen2's (single digits)
    "llama3": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


def write_bpe_tokenizer(folder: Path, vocab_size: int = 400, pre: str = "llama3") -> int:
    """Train a tiny byte-level BPE (Llama-3- or Qwen2-style regex) with `tokenizers`; returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_REGEXES[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"] if pre == "llama3" else
                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(BPE_CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    if pre == "llama3":
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "add_bos_token": True}
    else:   # Qwen2: no BOS
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **config, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}))
    return tok.get_vocab_size()


def make_tiny_llama(folder: Path, *, tokenizer: str = "spm", spm_model: Path | None = None, tied: bool = False,
                    dtype: str = "float32", vocab_pad: int = 0, max_shard_size: str | None = None,
                    seed: int = 0, arch: str = "llama", **config_overrides) -> Path:
    """A random LLaMA (GQA) saved with save_pretrained, plus a tokenizer. Weights are perturbed away from
    transformers' init (norms too) so that any mix-up of tensors shows in the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "spm":
        n_vocab = write_spm_tokenizer(folder, spm_model)
        ids = dict(bos_token_id=1, eos_token_id=2)
    elif tokenizer == "bpe":
        n_vocab = write_bpe_tokenizer(folder)
        ids = dict(bos_token_id=0, eos_token_id=3)
    else:
        raise ValueError(tokenizer)
    kw = {**TINY, **ids, "vocab_size": n_vocab + vocab_pad, "tie_word_embeddings": tied, **config_overrides}
    torch.manual_seed(seed)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def make_lora(base_dir: Path, out_dir: Path, *, r: int = 4, alpha: float = 8, targets=("q_proj", "k_proj",
              "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), use_rslora: bool = False,
              rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
              modules_to_save: list | None = None, steps: int = 3, seed: int = 0, lr: float = 2e-2) -> Path:
    """A PEFT LoRA adapter for base_dir trained for a few Adam steps on random tokens, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     modules_to_save=modules_to_save, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    n_vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, n_vocab, (2, 12))
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(out_dir)
    return Path(out_dir)


def scale_lora_layers(peft_model, scale: float) -> None:
    """Multiply every LoRA layer's scaling by `scale` (PEFT's scale_layer skips embedding layers: their
    factors are not in lora_A)."""
    from peft.tuners.lora import LoraLayer
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] *= scale


def merged_reference(base_dir: Path, adapters=()):
    """transformers model (float32) with the adapters merged by PEFT itself, in order, each at its scale."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for d, scale in adapters:
        pm = PeftModel.from_pretrained(model, d)
        scale_lora_layers(pm, scale)
        model = pm.merge_and_unload()
    model.eval()
    return model


def permute_qk_reference(w: np.ndarray, n_heads: int) -> np.ndarray:
    """docs/formats.md §4 written out: GGUF_row[h*hd + 2i + j] = HF_row[h*hd + j*hd/2 + i]."""
    hd = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + 2 * i + j] = w[h * hd + j * (hd // 2) + i]
    return out


def expected_gguf_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order) from a transformers LLaMA model, written independently of
    convert/names.py: the table of docs/formats.md §4 plus the Q/K permutation."""
    cfg = model.config
    sd = {k: v.detach().to(dtype=__import__("torch").float32).numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    table = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        for hf, g in table.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                w = permute_qk_reference(w, cfg.num_attention_heads)
            elif g == "attn_k":
                w = permute_qk_reference(w, n_kv)
            out[f"blk.{i}.{g}.weight"] = w
    return out


def hf_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """mean over positions of KL(softmax(ref) || softmax(logits)), computed in float64."""
    def logsoftmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p_log, q_log = logsoftmax(ref_logits), logsoftmax(logits)
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


BNB_MODES = ("nf4", "nf4-double-bf16", "fp4-double", "int8")


def make_bnb_checkpoint(base_dir: Path, out_dir: Path, mode: str) -> Path:
    """base_dir quantized by transformers' BitsAndBytesConfig on the CPU and saved with save_pretrained (the
    form QLoRA bases come in), with base_dir's tokenizer files. mode: one of BNB_MODES."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if mode == "int8":
        q, dtype = BitsAndBytesConfig(load_in_8bit=True), torch.float32
    else:   # the storage dtype (bf16: quant_state dtype and unquantized tensors); float32 compute
        dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float32
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode[:3],
                               bnb_4bit_use_double_quant="double" in mode, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=dtype, device_map="cpu")
    model.save_pretrained(out_dir)
    for p in Path(base_dir).glob("tokenizer*"):
        shutil.copy(p, Path(out_dir) / p.name)
    return Path(out_dir)


def bnb_reference_model(folder: Path, adapter: Path | None = None):
    """A bitsandbytes checkpoint loaded by transformers (float32 activations), optionally with a PEFT adapter
    on top (unmerged: QLoRA's own forward). bitsandbytes' AVX512-BF16 inference repacking is switched off so
    that every 4-bit layer runs bitsandbytes' dequantize + float32 matmul (the repacked path computes in bf16),
    and unquantized bf16 tensors (which transformers keeps in their stored dtype) are widened, exactly."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
    model.eval()
    return model
