"""bitsandbytes 4-bit / 8-bit checkpoints (QLoRA bases) in `llmrun convert`: dequantization bit-exact with
bitsandbytes itself; adapters merged onto that base match PEFT's merge and QLoRA's own (unmerged) forward."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_hf import (BNB_MODES, bnb_reference_model, expected_gguf_tensors, hf_logits, make_bnb_checkpoint,
                             make_lora, make_tiny_llama, mean_kl, merged_reference)

import bitsandbytes.functional as bnbf  # dev dependency; a missing one must fail, not skip
import gguf
import torch
from safetensors.torch import load_file as load_torch, save_file as save_torch

warnings.filterwarnings("ignore", category=UserWarning)

IDS = [0, 5, 9, 33, 100, 7, 250, 3, 64, 17, 120]
# row lengths are whole 64-value blocks: bitsandbytes' own CPU forward needs that (see test_odd_shapes_...)
DIMS = dict(hidden_size=64, intermediate_size=128)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="bpe", seed=20, **DIMS)


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    return {m: make_bnb_checkpoint(base, root / m, m) for m in BNB_MODES}


def _reference_weights(folder) -> dict[str, np.ndarray]:
    """bitsandbytes' own dequantization of every quantized weight in a saved checkpoint (float32)."""
    sd = load_torch(str(folder / "model.safetensors"))
    out = {}
    for key in sd:
        if ".quant_state.bitsandbytes__" in key:
            w = key.split(".quant_state.")[0]
            parts = {k[len(w) + 1:]: v for k, v in sd.items() if k.startswith(w + ".")}
            state = bnbf.QuantState.from_dict(parts, device=torch.device("cpu"))
            out[w] = bnbf.dequantize_4bit(sd[w], state).float().numpy()
        elif key.endswith(".SCB"):
            w = key[:-4] + ".weight"
            out[w] = bnbf.int8_vectorwise_dequant(sd[w], sd[key]).float().numpy()
    return out


def _dequantized_float_copy(folder, out_dir):
    """A float32 HF checkpoint holding bitsandbytes' dequantized weights: the base PEFT merges onto."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(folder)
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: torch.from_numpy(v) for k, v in _reference_weights(folder).items()}
    saved = load_torch(str(folder / "model.safetensors"))
    for k, v in saved.items():
        if v.is_floating_point() and k in model.state_dict() and k not in sd:
            sd[k] = v.float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.save_pretrained(out_dir)
    for p in folder.glob("tokenizer*"):
        shutil.copy(p, out_dir / p.name)
    return out_dir


def _quant_config(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("mode", BNB_MODES)
def test_dequantization_is_bit_exact(quantized, mode):
    from llmrun.convert.checkpoint import Checkpoint
    folder = quantized[mode]
    ref = _reference_weights(folder)
    assert len(ref) == 2 * len(LINEAR)
    with Checkpoint(folder, quantization=_quant_config(folder)) as ck:
        for name, want in ref.items():
            got = ck.load_f32(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want), name


@pytest.mark.parametrize("shape,blocksize,quant_type,nested,dtype,storage", [
    ((33, 71), 64, "nf4", True, torch.float32, torch.uint8),     # odd element count: a half-filled last byte
    ((17, 129), 128, "fp4", False, torch.bfloat16, torch.uint8),
    ((5, 301), 32, "fp4", True, torch.float16, torch.uint8),
    ((3, 999), 4096, "nf4", False, torch.float32, torch.uint8),  # one partial block
    ((64, 127), 64, "nf4", True, torch.bfloat16, torch.bfloat16),  # bnb_4bit_quant_storage: bytes seen as bf16
])
def test_odd_shapes_and_blocksizes(tmp_path, shape, blocksize, quant_type, nested, dtype, storage):
    """Blocks run over the flattened weight. (Odd row lengths make bitsandbytes' CPU kernel take that flat
    path too; for even rows that are not whole blocks its C kernel restarts blocks per row and disagrees with
    its own quantizer, so such shapes are not compared here.)"""
    from llmrun.convert.checkpoint import Checkpoint
    torch.manual_seed(1)
    w = (torch.randn(*shape) * 0.05).to(dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                                       quant_storage=storage)
    want = bnbf.dequantize_4bit(packed, state).float().numpy()
    tensors = {"layer.weight": packed}
    tensors.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_torch(tensors, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path, quantization={"quant_method": "bitsandbytes"}) as ck:
        assert ck.names() == ["layer.weight"] and ck.shape("layer.weight") == shape
        assert np.array_equal(ck.load_f32("layer.weight"), want)


@pytest.fixture(scope="module")
def float_adapter(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("lora") / "float", r=4, alpha=8, seed=7)


@pytest.mark.parametrize("mode", BNB_MODES)
def test_merge_onto_dequantized_base(quantized, float_adapter, mode, tmp_path):
    """Tensors: PEFT's merge onto bitsandbytes' dequantized weights, permuted; f32 output exact to 1e-6."""
    from llmrun.convert import convert_checkpoint
    out = tmp_path / "m.gguf"
    convert_checkpoint(quantized[mode], out, out_type="f32", loras=[(float_adapter, 0.5)])
    ref_dir = _dequantized_float_copy(quantized[mode], tmp_path / "float")
    expected = expected_gguf_tensors(merged_reference(ref_dir, [(float_adapter, 0.5)]))
    r = gguf.GGUFReader(str(out))
    assert {t.name for t in r.tensors} == set(expected)
    for t in r.tensors:
        np.testing.assert_allclose(np.asarray(t.data).reshape(expected[t.name].shape), expected[t.name],
                                   rtol=0, atol=1e-6, err_msg=t.name)


@pytest.fixture(scope="module")
def qlora(quantized, tmp_path_factory):
    """Adapters trained by PEFT on the 4-bit models themselves (QLoRA)."""
    root = tmp_path_factory.mktemp("qlora")
    return {m: make_lora(quantized[m], root / m, r=8, alpha=16, seed=8) for m in ("nf4-double-bf16", "fp4-double")}


def _llmrun_logits(path, ids=IDS):
    from llmrun.engine.model import LlamaModel
    from llmrun.gguf import GGUFReader
    with GGUFReader(path) as gr:
        return LlamaModel.load(gr, n_ctx=64, n_threads=1).forward(ids, all_logits=True)


@pytest.mark.parametrize("mode", ["nf4-double-bf16", "fp4-double"])
def test_qlora_logits_match_peft_on_the_4bit_model(quantized, qlora, mode, tmp_path):
    from llmrun.convert import convert_checkpoint
    theirs = hf_logits(bnb_reference_model(quantized[mode], qlora[mode]), IDS)
    out = convert_checkpoint(quantized[mode], tmp_path / "f32.gguf", out_type="f32", loras=[(qlora[mode], 1.0)])
    ours = _llmrun_logits(out)
    # bf16 storage: bitsandbytes' float32-compute forward skips the rounding to bf16 that its dequantize_4bit
    # (and PEFT's merge, and llmrun) apply, a difference of at most half a bf16 ulp per weight
    assert mean_kl(theirs, ours) <= (1e-5 if mode.endswith("bf16") else 1e-6)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    # the adapter matters: without it the logits are measurably different
    assert mean_kl(theirs, hf_logits(bnb_reference_model(quantized[mode]), IDS)) > 1e-4


def test_qlora_q8_0_is_ggml_quantization_of_the_merge(quantized, qlora, tmp_path):
    """--type q8_0: the merged weights quantized by gguf-py's Q8_0 (rare one-ulp merge differences allowed)."""
    from gguf.quants import quantize as py_quantize
    from llmrun.cli import main
    mode = "nf4-double-bf16"
    out = tmp_path / "q8.gguf"
    res = CliRunner().invoke(main, ["convert", str(quantized[mode]), "-o", str(out), "--type", "q8_0",
                                    "--lora", str(qlora[mode])])
    assert res.exit_code == 0, res.output
    ref_dir = _dequantized_float_copy(quantized[mode], tmp_path / "float")
    expected = expected_gguf_tensors(merged_reference(ref_dir, [(qlora[mode], 1.0)]))
    r = gguf.GGUFReader(str(out))
    n_q8 = 0
    for t in r.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            want = py_quantize(expected[t.name], gguf.GGMLQuantizationType.Q8_0)
            got = np.ascontiguousarray(t.data)
            assert got.shape == want.shape and np.mean(got != want) < 1e-3, t.name
            n_q8 += 1
    assert n_q8 >= 2 * len(LINEAR)
    theirs = hf_logits(bnb_reference_model(quantized[mode], qlora[mode]), IDS)
    assert (_llmrun_logits(out).argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


def test_int8_logits_match_bitsandbytes_model(quantized, tmp_path):
    """LLM.int8 also quantizes activations at run time, so its logits are only close to the dequantized base."""
    from llmrun.convert import convert_checkpoint
    out = convert_checkpoint(quantized["int8"], tmp_path / "i8.gguf", out_type="f32")
    theirs = hf_logits(bnb_reference_model(quantized["int8"]), IDS)
    ours = _llmrun_logits(out)
    assert mean_kl(theirs, ours) <= 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


# -- malformed inputs: one line, no output -------------------------------------------------------------------
Q = "model.layers.0.self_attn.q_proj"


def _bytes(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _set_state(tensors, key, **changes):
    s = {**json.loads(bytes(tensors[key].numpy()).decode()), **changes}
    tensors[key] = _bytes(json.dumps(s).encode())


def _mut_state_json(t):
    t[f"{Q}.weight.quant_state.bitsandbytes__nf4"] = _bytes(b"{not json")


MUTATIONS_4BIT = {
    "state_json": (_mut_state_json, "not valid JSON"),
    "blocksize": (lambda t: _set_state(t, f"{Q}.weight.quant_state.bitsandbytes__nf4", blocksize=48), "blocksize"),
    "shape": (lambda t: _set_state(t, f"{Q}.weight.quant_state.bitsandbytes__nf4", shape=[64, 65]), "bytes"),
    "dtype": (lambda t: _set_state(t, f"{Q}.weight.quant_state.bitsandbytes__nf4", dtype="int8"), "dtype"),
    "quant_type": (lambda t: _set_state(t, f"{Q}.weight.quant_state.bitsandbytes__nf4", quant_type="fp4"),
                   "quant_type"),
    "offset": (lambda t: _set_state(t, f"{Q}.weight.quant_state.bitsandbytes__nf4", nested_offset="x"),
               "nested_offset"),
    "no_absmax": (lambda t: t.pop(f"{Q}.weight.absmax"), "missing"),
    "absmax_count": (lambda t: t.update({f"{Q}.weight.absmax": t[f"{Q}.weight.absmax"][:-1].clone()}), "values"),
    "quant_map": (lambda t: t.update({f"{Q}.weight.quant_map": t[f"{Q}.weight.quant_map"] * 2}), "quant_map"),
    "nested_map": (lambda t: t.update({f"{Q}.weight.nested_quant_map": t[f"{Q}.weight.nested_quant_map"][:8].clone()}),
                   "nested_quant_map"),
    "no_state": (lambda t: t.pop(f"{Q}.weight.quant_state.bitsandbytes__nf4"), "incomplete"),
    "orphan_state": (lambda t: t.pop(f"{Q}.weight"), "no packed weight"),
    "two_states": (lambda t: t.update({f"{Q}.weight.quant_state.bitsandbytes__fp4":
                                       t[f"{Q}.weight.quant_state.bitsandbytes__nf4"].clone()}), "quant"),
}
MUTATIONS_INT8 = {
    "no_scb": (lambda t: t.pop(f"{Q}.SCB"), "int8"),
    "scb_count": (lambda t: t.update({f"{Q}.SCB": t[f"{Q}.SCB"][:3].clone()}), "values"),
    "weight_format": (lambda t: t.update({f"{Q}.weight_format": torch.tensor(1, dtype=torch.uint8)}),
                      "weight_format"),
    "weight_dtype": (lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"].float()}), "int8"),
}


def _fail(src, tmp_path, expect):
    from llmrun.cli import main
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert expect in lines[0], lines[0]
    assert "Traceback" not in res.output and not list(out.parent.iterdir())


def _mutated_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    tensors = load_torch(str(src / "model.safetensors"))
    mutate(tensors)
    save_torch(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", sorted(MUTATIONS_4BIT))
def test_malformed_4bit(quantized, tmp_path, name):
    mutate, expect = MUTATIONS_4BIT[name]
    src = "nf4-double-bf16" if name in ("offset", "nested_map") else "nf4"
    _fail(_mutated_copy(quantized[src], tmp_path / "bad", mutate), tmp_path, expect)


@pytest.mark.parametrize("name", sorted(MUTATIONS_INT8))
def test_malformed_int8(quantized, tmp_path, name):
    mutate, expect = MUTATIONS_INT8[name]
    _fail(_mutated_copy(quantized["int8"], tmp_path / "bad", mutate), tmp_path, expect)


def test_other_quantization_methods_and_missing_config(quantized, tmp_path):
    src = tmp_path / "gptq"
    shutil.copytree(quantized["nf4"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    _fail(src, tmp_path, "gptq")
    del cfg["quantization_config"]
    (src / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(tmp_path / "out")
    _fail(src, tmp_path, "U8")
