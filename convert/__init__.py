"""Hugging Face LLaMA checkpoints + PEFT LoRA adapters -> GGUF, written through llmrun.gguf.

    from llmrun.convert import convert_checkpoint
    convert_checkpoint("path/to/hf", "out.gguf", out_type="q4_k_m", loras=[("path/to/adapter", 1.0)])
"""
from .pipeline import convert_checkpoint

__all__ = ["convert_checkpoint"]
