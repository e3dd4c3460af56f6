"""Bad inputs to `llmrun convert`: each is one clean line on stderr, exit 1, no traceback, and nothing is
written (no output, no temp file, an existing output untouched)."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_hf import make_lora, make_tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama2_tokenizer_model):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, seed=20)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("lora") / "ok", targets=("q_proj", "v_proj"), steps=1)


def _fail(args, out_dir, expect: str):
    """Run the CLI, require exit 1 with one `error:` line mentioning `expect`, and out_dir unchanged."""
    from llmrun.cli import main

    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out_dir.iterdir())
    res = CliRunner().invoke(main, ["convert", *map(str, args)])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    assert expect.lower() in lines[0].lower(), lines[0]
    after = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in out_dir.iterdir())
    assert after == before      # no output, no leftover temp file, nothing replaced
    return lines[0]


def _copy_adapter(src, dst, **config_changes):
    shutil.copytree(src, dst)
    p = dst / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(config_changes)
    p.write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_dora_adapter(base, adapter, out_dir, tmp_path):
    bad = _copy_adapter(adapter, tmp_path / "dora", use_dora=True)
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], out_dir, "DoRA")


def test_unknown_target_module(base, adapter, out_dir, tmp_path):
    bad = _copy_adapter(adapter, tmp_path / "unk", target_modules=["q_proj", "fc1"])
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], out_dir, "fc1")


def test_other_peft_type(base, adapter, out_dir, tmp_path):
    bad = _copy_adapter(adapter, tmp_path / "ia3", peft_type="IA3")
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], out_dir, "IA3")


def test_missing_adapter_files(base, adapter, out_dir, tmp_path):
    _fail([base, "-o", out_dir / "m.gguf", "--lora", tmp_path / "nowhere"], out_dir, "not found")
    bad = _copy_adapter(adapter, tmp_path / "noweights")
    (bad / "adapter_model.safetensors").unlink()
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], out_dir, "adapter_model.safetensors")
    bad2 = _copy_adapter(adapter, tmp_path / "noconfig")
    (bad2 / "adapter_config.json").unlink()
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad2], out_dir, "adapter_config.json")
    bad3 = _copy_adapter(adapter, tmp_path / "badjson")
    (bad3 / "adapter_config.json").write_text("{not json")
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad3], out_dir, "cannot parse")


def _fake_adapter(folder, template, tensors: dict):
    from safetensors.numpy import save_file
    folder.mkdir()
    shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
    save_file({k: np.zeros(s, dtype=np.float32) for k, s in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def test_adapter_for_a_different_base(base, adapter, out_dir, tmp_path):
    p = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    hidden32 = _fake_adapter(tmp_path / "h32", adapter, {p.format(0, "A"): (4, 32), p.format(0, "B"): (64, 4)})
    _fail([base, "-o", out_dir / "m.gguf", "--lora", hidden32], out_dir, "different base")
    layers = _fake_adapter(tmp_path / "l5", adapter, {p.format(5, "A"): (4, 64), p.format(5, "B"): (64, 4)})
    _fail([base, "-o", out_dir / "m.gguf", "--lora", layers], out_dir, "layer 5")
    rank = _fake_adapter(tmp_path / "r2", adapter, {p.format(0, "A"): (2, 64), p.format(0, "B"): (64, 2)})
    _fail([base, "-o", out_dir / "m.gguf", "--lora", rank], out_dir, "rank 2")
    lonely = _fake_adapter(tmp_path / "lonely", adapter, {p.format(0, "A"): (4, 64)})
    _fail([base, "-o", out_dir / "m.gguf", "--lora", lonely], out_dir, "partner")


def test_truncated_shard(base, out_dir, tmp_path):
    src = tmp_path / "trunc"
    shutil.copytree(base, src)
    st = src / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 1000])
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "truncated")
    st.write_bytes(data[:5])
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "truncated")


def test_missing_weights_and_config(base, out_dir, tmp_path):
    src = tmp_path / "noweights"
    shutil.copytree(base, src)
    (src / "model.safetensors").unlink()
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "model.safetensors")
    (src / "config.json").unlink()
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "config.json")
    _fail([tmp_path / "absent", "-o", out_dir / "m.gguf"], out_dir, "not found")


def test_missing_tokenizer(base, out_dir, tmp_path):
    src = tmp_path / "notok"
    shutil.copytree(base, src)
    for p in src.glob("tokenizer*"):
        p.unlink()
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "tokenizer")


def test_unsupported_architecture_and_type(base, out_dir, tmp_path):
    src = tmp_path / "gpt2"
    shutil.copytree(base, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "GPT2LMHeadModel")
    _fail([base, "-o", out_dir / "m.gguf", "--type", "q9_9"], out_dir, "q9_9")
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["sliding_window"] = "32"   # a window is supported (test_relatives.py); a malformed one is refused
    (src / "config.json").write_text(json.dumps(cfg))
    _fail([src, "-o", out_dir / "m.gguf"], out_dir, "sliding")


def test_existing_output_needs_force(base, out_dir):
    out = out_dir / "m.gguf"
    out.write_bytes(b"previous contents")
    _fail([base, "-o", out], out_dir, "--force")
    assert out.read_bytes() == b"previous contents"
    from llmrun.cli import main
    res = CliRunner().invoke(main, ["convert", str(base), "-o", str(out), "--force"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]


def test_output_is_the_input(base, adapter):
    _fail([base, "-o", base], base, "folder")
    _fail([base, "-o", base / "model.safetensors", "--force"], base, "input")
    _fail([base, "-o", adapter / "adapter_model.safetensors", "--force", "--lora", adapter], adapter, "input")


def test_failure_while_writing_keeps_previous_file(base, out_dir, monkeypatch):
    """An error in the middle of the tensor stream: the old file stays byte-identical, no temp file remains."""
    import llmrun.convert.pipeline as pipeline
    from llmrun.convert import convert_checkpoint
    from llmrun.errors import ConvertError

    out = out_dir / "m.gguf"
    out.write_bytes(b"old model")
    calls = []

    def exploding_permute(w, heads):
        calls.append(heads)
        if len(calls) == 3:
            raise ConvertError("simulated failure in the middle of writing")
        return w

    monkeypatch.setattr(pipeline, "permute_rows", exploding_permute)
    with pytest.raises(ConvertError, match="simulated"):
        convert_checkpoint(base, out, overwrite=True)
    assert len(calls) == 3
    assert out.read_bytes() == b"old model"
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]
