"""Hostile checkpoints and adapters for `llmrun convert` (issue 10, defects 3, 4, 5, 8 and the "false" strings
of 9): each is one `error:` line, exit 1, nothing written, and no file outside the input folders is read."""
from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.limits import outcomes, run_limited
from helpers.tiny_hf import make_lora, make_tiny_llama

warnings.filterwarnings("ignore", category=UserWarning)
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="bpe", seed=31)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "sharded", tokenizer="bpe", seed=32,
                           max_shard_size="40KB")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("lora") / "ok", targets=("q_proj", "v_proj"), steps=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DROP:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


_DROP = object()


def _edit_header(path: Path, fn) -> None:
    """Rewrite a safetensors file's JSON header through fn(header) (data bytes unchanged)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    fn(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _fail(args, expect: str, out_dir: Path):
    from llmrun.cli import main
    before = sorted(p.name for p in out_dir.iterdir())
    res = CliRunner().invoke(main, ["convert", *map(str, args)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "internal error" not in lines[0] and "Traceback" not in res.output
    assert expect.lower() in lines[0].lower(), lines[0]
    assert sorted(p.name for p in out_dir.iterdir()) == before
    return lines[0]


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


# --- checkpoint files of the wrong shape (defect 5) ---------------------------------------------------------
def _header_case(change):
    def edit(folder: Path):
        _edit_header(folder / "model.safetensors", change)
    return edit


def _set_entry(field, value):
    def change(h):
        h[_first_tensor(h)][field] = value
    return change


CHECKPOINT_CASES = {
    "data_offsets_floats": (_header_case(_set_entry("data_offsets", [0.0, 16.0])), "data_offsets"),
    "data_offsets_strings": (_header_case(_set_entry("data_offsets", ["0", "16"])), "data_offsets"),
    "data_offsets_three": (_header_case(_set_entry("data_offsets", [0, 8, 16])), "data_offsets"),
    "dtype_list": (_header_case(_set_entry("dtype", ["F32"])), "dtype"),
    "shape_string": (_header_case(_set_entry("shape", "12")), "shape"),
    "shape_floats": (_header_case(_set_entry("shape", [2.5, 2])), "shape"),
    "entry_not_object": (_header_case(_set_entry("dtype", None)), "dtype"),
    "header_deep": (lambda f: _raw_header(f / "model.safetensors", DEEP.encode()), "nested too deeply"),
    "overlap": (_header_case(lambda h: _overlap(h)), "overlap"),
    "config_deep": (lambda f: (f / "config.json").write_text(DEEP), "nested too deeply"),
    "tokenizer_config_deep": (lambda f: (f / "tokenizer_config.json").write_text(DEEP), "nested too deeply"),
    "tokenizer_json_deep": (lambda f: (f / "tokenizer.json").write_text(DEEP), "nested too deeply"),
    "special_tokens_map_deep": (lambda f: (f / "special_tokens_map.json").write_text(DEEP), "nested too deeply"),
    "chat_template_json_deep": (lambda f: (f / "chat_template.json").write_text(DEEP), "nested too deeply"),
    "rms_norm_eps_list": (lambda f: _edit_json(f / "config.json", rms_norm_eps=[1e-5]), "rms_norm_eps"),
    "rms_norm_eps_string": (lambda f: _edit_json(f / "config.json", rms_norm_eps="1e-5"), "rms_norm_eps"),
    "sliding_window_string": (lambda f: _edit_json(f / "config.json", sliding_window="abc"), "sliding_window"),
    "rope_factor_list": (lambda f: _rope(f, rope_type="linear", factor=[2.0]), "factor"),
    "rope_factor_list_old_key": (lambda f: _edit_json(f / "config.json", rope_parameters=_DROP, rope_scaling={
        "type": "linear", "factor": [2.0]}), "factor"),
    "rope_llama3_lists": (lambda f: _rope(f, rope_type="llama3", factor=8.0, low_freq_factor=[1.0],
                                          high_freq_factor=4.0), "low_freq_factor"),
    "rope_llama3_equal_factors": (lambda f: _rope(f, rope_type="llama3", factor=8.0, low_freq_factor=4.0,
                                                  high_freq_factor=4.0), "high_freq_factor"),
    "rope_theta_huge": (lambda f: _rope(f, rope_theta=1e300), "rope_theta"),
    "rope_theta_string": (lambda f: _edit_json(f / "config.json", rope_parameters=_DROP, rope_theta="1e4"),
                          "rope_theta"),
    "rope_type_list": (lambda f: _rope(f, rope_type=["yarn"]), "rope_type"),
    "rope_parameters_string": (lambda f: _edit_json(f / "config.json", rope_parameters="linear"),
                               "rope_parameters"),
    "architectures_string": (lambda f: _edit_json(f / "config.json", architectures="LlamaForCausalLM"),
                             "architectures"),
    "hidden_size_string": (lambda f: _edit_json(f / "config.json", hidden_size="64"), "hidden_size"),
    "vocab_size_float": (lambda f: _edit_json(f / "config.json", vocab_size=400.0), "vocab_size"),
    "added_tokens_decoder_list": (lambda f: _edit_json(f / "tokenizer_config.json", added_tokens_decoder=[1]),
                                  "added_tokens_decoder"),
    "tokenizer_model_list": (lambda f: _edit_json(f / "tokenizer.json", model=[1]), "tokenizer.json"),
    "merges_ints": (lambda f: _edit_tokenizer_json(f, lambda d: d["model"].update(merges=[1, 2, 3])),
                    "tokenizer.json"),
}


def _rope(folder: Path, **block) -> None:
    _edit_json(folder / "config.json", rope_parameters={"rope_theta": 10000.0, "rope_type": "default", **block})


def _raw_header(path: Path, header: bytes) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


def _overlap(h: dict) -> None:
    names = [k for k in h if k != "__metadata__"]
    a, b = next((x, y) for x in names for y in names if x != y and h[x]["dtype"] == h[y]["dtype"]
                and h[x]["shape"] == h[y]["shape"])
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _edit_tokenizer_json(folder: Path, fn) -> None:
    p = folder / "tokenizer.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_checkpoint_file_of_the_wrong_shape(base, tmp_path, out_dir, case):
    edit, expect = CHECKPOINT_CASES[case]
    src = _copy(base, tmp_path / "src")
    edit(src)
    _fail([src, "-o", out_dir / "m.gguf"], expect, out_dir)


def test_sharded_index_of_the_wrong_shape(sharded, tmp_path, out_dir):
    src = _copy(sharded, tmp_path / "src")
    index = src / "model.safetensors.index.json"
    original = index.read_text()
    data = json.loads(original)
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = [data["weight_map"][name]]
    index.write_text(json.dumps(data))
    _fail([src, "-o", out_dir / "m.gguf"], "weight_map", out_dir)
    index.write_text(DEEP)
    _fail([src, "-o", out_dir / "m.gguf"], "nested too deeply", out_dir)


# --- adapters of the wrong shape ------------------------------------------------------------------------------
ADAPTER_CASES = {
    "target_modules_ints": ({"target_modules": [1]}, "target_modules"),
    "alpha_pattern_strings": ({"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern"),
    "rank_pattern_bad_regex": ({"rank_pattern": {"q_proj(": 4}}, "regular expression"),
    "rank_pattern_float": ({"rank_pattern": {"q_proj": 4.5}}, "rank_pattern"),
    "r_string": ({"r": "4"}, "r must"),
    "modules_to_save_ints": ({"modules_to_save": [1]}, "modules_to_save"),
    "use_rslora_object": ({"use_rslora": {"a": 1}}, "use_rslora"),
    "adapter_config_deep": (DEEP, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CASES))
def test_adapter_config_of_the_wrong_shape(base, adapter, tmp_path, out_dir, case):
    change, expect = ADAPTER_CASES[case]
    bad = _copy(adapter, tmp_path / "bad")
    if isinstance(change, str):
        (bad / "adapter_config.json").write_text(change)
    else:
        _edit_json(bad / "adapter_config.json", **change)
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], expect, out_dir)


def test_false_strings_in_adapter_and_config_are_false(base, adapter, tmp_path, out_dir):
    """ "false" must not switch a feature on: use_dora "false" is not DoRA, tie_word_embeddings "false" keeps
    lm_head, use_rslora "false" is plain LoRA (same file as with the JSON false)."""
    from llmrun.convert import convert_checkpoint
    from llmrun.gguf import GGUFReader
    a = _copy(adapter, tmp_path / "a")
    _edit_json(a / "adapter_config.json", use_dora="false", use_rslora="false")
    b = _copy(adapter, tmp_path / "b")
    _edit_json(b / "adapter_config.json", use_dora=False, use_rslora=False)
    src = _copy(base, tmp_path / "src")
    _edit_json(src / "config.json", tie_word_embeddings="false", attention_bias="false")
    convert_checkpoint(src, out_dir / "a.gguf", loras=[(a, 1.0)])
    convert_checkpoint(base, out_dir / "b.gguf", loras=[(b, 1.0)])
    with GGUFReader(out_dir / "a.gguf") as ra, GGUFReader(out_dir / "b.gguf") as rb:
        assert "output.weight" in ra.tensors
        assert ra.tensors["blk.0.attn_q.weight"].data.tobytes() == rb.tensors["blk.0.attn_q.weight"].data.tobytes()


# --- 3. counts checked against the checkpoint before allocating -----------------------------------------------
def test_huge_layer_count_fails_before_building_shapes(base, tmp_path):
    src = _copy(base, tmp_path / "src")
    _edit_json(src / "config.json", num_hidden_layers=10 ** 7)
    body = f"""
        try:
            convert_checkpoint({str(src)!r}, {str(tmp_path / "m.gguf")!r})
            print(json.dumps({{"outcome": "converted"}}))
        except LlmrunError as e:
            print(json.dumps({{"outcome": type(e).__name__ + ": " + str(e)}}))
    """
    res = outcomes(run_limited("import json\nfrom llmrun.convert import convert_checkpoint\n"
                               "from llmrun.errors import LlmrunError", body, extra_mb=500))
    assert res["outcome"].startswith("ConvertError") and "num_hidden_layers" in res["outcome"], res


# --- 4. NaN / Inf ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_non_finite_weights_are_not_converted(base, tmp_path, out_dir, out_type):
    from safetensors.numpy import load_file, save_file
    src = _copy(base, tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = np.inf
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    _fail([src, "-o", out_dir / "m.gguf", "--type", out_type], "blk.1.ffn_up.weight", out_dir)


def test_nan_lora_is_not_merged(base, adapter, tmp_path, out_dir):
    from safetensors.numpy import load_file, save_file
    bad = _copy(adapter, tmp_path / "nan")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    _fail([base, "-o", out_dir / "m.gguf", "--lora", bad], "NaN", out_dir)


# --- 8. nothing outside the folder is read --------------------------------------------------------------------
def test_shard_index_cannot_reach_outside(sharded, tmp_path, out_dir):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    outside_shard = next(sharded.glob("model-*.safetensors"))
    shutil.copy(outside_shard, secret_dir / "stolen.safetensors")
    src = _copy(sharded, tmp_path / "ckpt" / "src")
    index = src / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    for name in ("../../secret/stolen.safetensors", str(secret_dir / "stolen.safetensors"),
                 "sub/../../../secret/stolen.safetensors"):
        data["weight_map"][first] = name
        index.write_text(json.dumps(data))
        _fail([src, "-o", out_dir / "m.gguf"], "outside", out_dir)


def test_symlinks_out_of_the_folder_are_refused(base, sharded, tmp_path, out_dir):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # a shard, the single weights file, a JSON file and the chat template as symlinks to files outside
    src = _copy(sharded, tmp_path / "a")
    shard = next(src.glob("model-*.safetensors"))
    shutil.move(shard, outside / shard.name)
    shard.symlink_to(outside / shard.name)
    _fail([src, "-o", out_dir / "m.gguf"], "outside", out_dir)

    single = _copy(base, tmp_path / "b")
    shutil.move(single / "model.safetensors", outside / "model.safetensors")
    (single / "model.safetensors").symlink_to(outside / "model.safetensors")
    _fail([single, "-o", out_dir / "m.gguf"], "outside", out_dir)

    for name in ("tokenizer_config.json", "chat_template.jinja", "config.json"):
        folder = _copy(base, tmp_path / f"c_{name}")
        (outside / name).write_text("{}" if name.endswith(".json") else "{{ secret }}")
        target = folder / name
        if target.exists():
            target.unlink()
        target.symlink_to(outside / name)
        _fail([folder, "-o", out_dir / "m.gguf"], "outside", out_dir)


def test_symlinks_inside_the_folder_and_the_hf_cache_layout_work(base, tmp_path, out_dir):
    """huggingface_hub's cache: snapshots/<rev>/* are symlinks into ../../blobs -- allowed."""
    from llmrun.convert import convert_checkpoint
    repo = tmp_path / "models--x--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in base.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    convert_checkpoint(snap, out_dir / "cache.gguf")
    assert (out_dir / "cache.gguf").exists()
