"""Special tokens, add_* flags and the chat template of a Hugging Face tokenizer folder, as gguf-py's
SpecialVocab reads them (tokenizer_config.json, special_tokens_map.json, tokenizer.json's post-processor,
config.json's *_token_id)."""
from __future__ import annotations

import logging
from pathlib import Path

from llmrun.gguf.metadata import parse_bool

from .vocab_files import json_object, json_objects, read_json, read_text

log = logging.getLogger("convert.vocab")

# special token kinds read from tokenizer_config.json / config.json, and their GGUF keys
# (gguf-py writes no key for "cls")
SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic, llama.cpp's spelling
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": None,
    "mask": "tokenizer.ggml.mask_token_id",
}


def _content(entry) -> str | None:
    """The text of a special token entry in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_id(item: dict) -> str | None:
    return json_object(json_object(item).get("SpecialToken")).get("id")


def _sequence_id(item: dict) -> str | None:
    return json_object(json_object(item).get("Sequence")).get("id")


def _read_post_processor(post: dict, texts: dict[str, str | None], add: dict[str, bool], have_config: bool):
    """What a tokenizer.json post-processor says about BOS / EOS / SEP (as gguf-py reads it:
    RobertaProcessing adds all three; a simple TemplateProcessing is read for the single-sequence
    wrapping and for a separator between the two sequences of a pair)."""
    for proc in json_objects(post.get("processors", [post])):
        if proc.get("type") == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
            for kind, fallback in (("cls", "bos"), ("sep", "eos")):
                given = proc.get(kind)
                given = given[0] if isinstance(given, list) and given and isinstance(given[0], str) else None
                texts[kind] = texts[kind] or given or texts[fallback]
            continue
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") if isinstance(proc.get("single"), list) else []
        pair = proc.get("pair") if isinstance(proc.get("pair"), list) else []
        first = last = None
        if len(single) > 1:
            first, last = _special_id(single[0]), _special_id(single[-1])
            if first:
                if not have_config:
                    texts["bos"] = first
                add["bos"] = first in (texts["bos"], texts["cls"])
            if last:
                if not have_config:
                    texts["eos"] = last
                elif last != texts["eos"]:
                    log.warning("TemplateProcessing ends with %r, not the EOS token %r", last, texts["eos"])
                add["eos"] = last == texts["eos"]
        if pair:
            begin = 1 if first and _special_id(pair[0]) == first else 0
            end = len(pair) - 1 if last and _special_id(pair[-1]) == last else len(pair)
            inner = pair[begin:end]
            if len(inner) > 2 and _sequence_id(inner[0]) == "A" and _sequence_id(inner[-1]) == "B":
                middle = inner[1:-1]
                separators = (texts["sep"], texts["eos"])
                add_sep = _special_id(middle[0]) in separators and not last
                if len(middle) == 2 and _special_id(middle[1]) in separators:
                    add_sep = True
                add["sep"] = add_sep
                if add_sep and not texts["sep"] and have_config:
                    texts["sep"] = texts["eos"]


def special_vocab(hf_dir: Path, n_vocab: int, tokenizer_json: dict | None):
    """(ids {kind: id}, add flags {kind: bool}, chat template str | list | None), like gguf-py's
    SpecialVocab: token texts from tokenizer_config.json (special_tokens_map.json fills gaps, an
    extension) resolved through tokenizer.json's added_tokens, then config.json's *_token_id."""
    config = read_json(hf_dir / "tokenizer_config.json")
    special_map = read_json(hf_dir / "special_tokens_map.json") or {}
    texts = {kind: _content((config or {}).get(f"{kind}_token")) or _content(special_map.get(f"{kind}_token"))
             for kind in SPECIAL_KEYS}
    if config is not None:
        texts["bos"] = texts["bos"] or texts["cls"]
        texts["eos"] = texts["eos"] or texts["sep"]
    add: dict[str, bool] = {}
    if tokenizer_json and isinstance(tokenizer_json.get("post_processor"), dict):
        _read_post_processor(tokenizer_json["post_processor"], texts, add, config is not None)

    template = None
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        template = read_text(jinja, hf_dir)
    elif (hf_dir / "chat_template.json").is_file():
        template = (read_json(hf_dir / "chat_template.json") or {}).get("chat_template")
    if config is not None:
        template = config.get("chat_template", template)
        for kind in SPECIAL_KEYS:
            flag = parse_bool(config.get(f"add_{kind}_token"))
            if flag is not None:
                add[kind] = flag
    if not isinstance(template, (str, list)):
        template = None

    ids: dict[str, int] = {}

    def set_id(kind: str, tid) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab and kind not in ids:
            ids[kind] = tid

    added_tokens = json_objects(json_object(tokenizer_json).get("added_tokens"))
    if config is not None:
        for kind, text in texts.items():
            if text is not None:
                set_id(kind, next((a.get("id") for a in added_tokens if a.get("content") == text), None))
    model_config = read_json(hf_dir / "config.json") or {}
    for kind in SPECIAL_KEYS:
        tid = model_config.get(f"{kind}_token_id")
        if tid is None and isinstance(model_config.get("text_config"), dict):
            tid = model_config["text_config"].get(f"{kind}_token_id")
        set_id(kind, tid)
    return ids, add, template
