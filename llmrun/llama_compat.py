"""llama-cpp-python's ``Llama(...)`` keywords that mean nothing on this engine, or only at one value.

Code written for llama-cpp-python passes GPU, batching and memory-mapping settings; llmrun accepts them so
that code runs unchanged. ``check_constructor_keywords`` sorts what the caller passed into notes (ignored
settings, printed under ``verbose``) and errors (a setting that would change the results but is not
supported here, or a name llama-cpp-python does not have either).
"""
from __future__ import annotations

from typing import Any, Mapping

from .errors import LlmrunError

# No effect on results here: offloading, batching, memory mapping/locking, threading, logging.
IGNORED = {
    "n_gpu_layers": "no GPU offload: the CPU engine runs every layer",
    "split_mode": "no GPU split", "main_gpu": "no GPU", "tensor_split": "no GPU split",
    "offload_kqv": "no GPU offload", "op_offload": "no GPU offload",
    "use_mmap": "weights are always memory-mapped", "use_mlock": "memory is not locked",
    "n_batch": "prompts are evaluated in chunks of 256 tokens", "n_ubatch": "prompts are evaluated in chunks",
    "n_threads_batch": "one thread count (n_threads) for prompt and generation",
    "flash_attn": "attention kernels are fixed", "swa_full": "no sliding-window cache",
    "logits_all": "logprobs are always available", "last_n_tokens_size": "repeat_last_n is set per call",
    "no_perf": "timings are cheap", "numa": "no NUMA placement", "spm_infill": "no infill mode",
    "attention_type": "causal attention", "n_seq_max": "one sequence per Llama",
}

# Accepted at the value that changes nothing (llama-cpp-python's default); anything else is refused.
NEUTRAL = {
    "kv_overrides": None, "rope_scaling_type": -1, "rope_freq_base": 0.0, "rope_freq_scale": 0.0,
    "yarn_ext_factor": -1.0, "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0,
    "yarn_orig_ctx": 0, "chat_handler": None, "draft_model": None, "tokenizer": None, "lora_base": None,
}


def check_constructor_keywords(kwargs: Mapping[str, Any]) -> list[str]:
    """Notes for the ignored keywords; raises for unknown ones and for unsupported non-neutral values."""
    notes = []
    for name, value in kwargs.items():
        if name in IGNORED:
            notes.append(f"{name}={value!r} ignored: {IGNORED[name]}")
        elif name in NEUTRAL:
            if value != NEUTRAL[name] and not (value is None and NEUTRAL[name] in (0, 0.0, -1)):
                raise LlmrunError(f"Llama({name}={value!r}) is not supported by llmrun "
                                  f"(leave it at {NEUTRAL[name]!r})")
        else:
            raise TypeError(f"Llama() got an unexpected keyword argument {name!r}")
    return notes


def completion_notes(options) -> list[str]:
    """Notes for sampler settings llmrun does not have, left at a value other than their neutral one."""
    return [f"{name}={getattr(options, name)!r} ignored: llmrun has no such sampler"
            for name, neutral in options.NEUTRAL.items() if getattr(options, name) != neutral]
