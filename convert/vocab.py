"""Hugging Face tokenizer folder -> GGUF ``tokenizer.*`` metadata, the way llama.cpp's converter
writes it for LLaMA models (convert_hf_to_gguf.py: LlamaModel.set_vocab, _set_vocab_sentencepiece,
_set_vocab_gpt2 / get_vocab_base, gguf-py's SpecialVocab).

* ``tokenizer.model`` present -> SentencePiece vocabulary, ``tokenizer.ggml.model = "llama"``.
* else a byte-level BPE ``tokenizer.json`` -> ``"gpt2"`` with merges and a pre-tokenizer name.

Pre-tokenizer detection (``tokenizer.ggml.pre``): llama.cpp hashes the tokenizer's output on a test
string and looks the hash up in a table of known published models. We cannot compute those hashes
without the models, so we read the tokenizer.json ``pre_tokenizer`` configuration instead and map
the known shapes to the name llama.cpp would choose (see ``detect_pre``); an unknown shape is an
error, as in llama.cpp.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from llmrun.errors import ConvertError, is_library_failure, one_line
from llmrun.gguf import GGUFValueType as VT
from llmrun.gguf.metadata import is_integer, parse_bool
from llmrun.text.tokenizer import TokenType

from .jsonfile import read_json_object
from .safepaths import inside

log = logging.getLogger("convert.vocab")

KV = tuple  # (key, value, GGUFValueType, element GGUFValueType | None)

# special token kinds read from tokenizer_config.json / config.json, and their GGUF keys
# (gguf-py writes no key for "cls")
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic, llama.cpp's spelling
    "pad": "tokenizer.ggml.padding_token_id",
    "cls": None,
    "mask": "tokenizer.ggml.mask_token_id",
}

# architectures whose SentencePiece vocabulary llama.cpp writes without the space prefix (Gemma's)
_NO_SPACE_PREFIX = ("gemma2", "gemma3")

# pre-tokenizer regexes as published in tokenizer.json files (JSON-decoded)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _read_json(path: Path) -> dict | None:
    return read_json_object(path) if path.is_file() else None


def _obj(value) -> dict:
    """A JSON value expected to be an object: itself, or {} for anything else (the file may hold anything)."""
    return value if isinstance(value, dict) else {}


def _objects(value) -> list[dict]:
    """A JSON value expected to be a list of objects: its objects (other entries ignored)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _tokenizers_call(path: Path, what: str, fn, *args, **kwargs):
    """A call into HF tokenizers, whose errors (and Rust panics, BaseExceptions) become one ConvertError."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if not is_library_failure(e):
            raise
        raise ConvertError(f"{path}: {what} ({one_line(e)})") from None


def _read_text(path: Path, folder: Path) -> str:
    inside(path, folder)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None


def does_token_look_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (same rule as llama.cpp's converter)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


# --- SentencePiece ----------------------------------------------------------------------------
def _sentencepiece_vocab(hf_dir: Path, n_vocab: int | None, flavor: str = "llama"):
    from sentencepiece import SentencePieceProcessor

    path = inside(hf_dir / "tokenizer.model", hf_dir)
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the damage
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e})") from None
    sp_size = sp.vocab_size()
    vocab_size = n_vocab or sp_size
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    if sp_size > vocab_size:
        log.warning("%s: %d pieces but vocab_size is %d, extra pieces dropped", path, sp_size, vocab_size)
    for i in range(min(sp_size, vocab_size)):
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(t)

    added = _read_json(hf_dir / "added_tokens.json") or {}
    for text, tid in added.items():
        if is_integer(tid) and 0 <= tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(TokenType.USER_DEFINED)
    config = _read_json(hf_dir / "tokenizer_config.json") or {}
    entries = list(_added_tokens_decoder(hf_dir, config).items())
    if flavor == "phi3":   # llama.cpp's Phi-3 converter also reads tokenizer.json's added tokens
        tj = _read_json(hf_dir / "tokenizer.json") or {}
        listed = tj.get("added_tokens") if isinstance(tj.get("added_tokens"), list) else []
        entries += [(str(a.get("id")), a) for a in listed if isinstance(a, dict) and is_integer(a.get("id"))]
    for key, data in entries:
        tid, text = int(key), data.get("content")
        if not isinstance(text, str) or not 0 <= tid < vocab_size:
            continue
        if flavor == "phi3":   # taken as written: control if special, else user-defined
            types[tid] = int(TokenType.CONTROL if parse_bool(data.get("special")) else TokenType.USER_DEFINED)
        elif parse_bool(data.get("special")) or does_token_look_special(text):
            types[tid] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # user-defined tokens are matched pre-normalized
            types[tid] = int(TokenType.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types


def _added_tokens_decoder(hf_dir: Path, config: dict) -> dict[str, dict]:
    """tokenizer_config.json's added_tokens_decoder: {"<id>": {"content": ..., "special": ...}} (entries of
    another shape are skipped; a value that is not an object at all is an error)."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return {}
    if not isinstance(decoder, dict):
        raise ConvertError(f"{hf_dir / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
    return {k: v for k, v in decoder.items() if k.isdigit() and len(k) < 12 and isinstance(v, dict)}


# --- byte-level BPE ---------------------------------------------------------------------------
def detect_pre(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizer.json pre_tokenizer configuration.

    Rules (instead of llama.cpp's output hash): a Split on the Llama 3 regex -> "llama-bpe"; on the
    Qwen2 regex -> "qwen2"; Digits(individual) + ByteLevel(regex) -> "smollm" (SmolLM/StarCoder,
    one pre-tokenizer); a lone ByteLevel(regex) -> "gpt-2".
    """
    pre = _obj(tokenizer_json.get("pre_tokenizer"))
    steps = _objects(pre.get("pretokenizers")) if pre.get("type") == "Sequence" else [pre]
    kinds = []
    for s in steps:
        t = s.get("type")
        if t == "Split":
            pattern = _obj(s.get("pattern"))
            kinds.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif t == "ByteLevel":
            kinds.append(("ByteLevel", bool(s.get("use_regex", True))))
        elif t == "Digits":
            kinds.append(("Digits", bool(s.get("individual_digits", False))))
        else:
            kinds.append((t, None))
    if kinds == [("Split", _LLAMA3_REGEX), ("ByteLevel", False)]:
        return "llama-bpe"
    if kinds == [("Split", _QWEN2_REGEX), ("ByteLevel", False)]:
        return "qwen2"
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    if kinds == [("ByteLevel", True)]:
        return "gpt-2"
    raise ConvertError(f"{where}: pre-tokenizer {str(kinds)[:200]} is not one we know how to name for llama.cpp "
                       f"(known: llama-bpe, qwen2, smollm, gpt-2)")


def _bpe_vocab(hf_dir: Path, n_vocab: int | None):
    from tokenizers import Tokenizer as HFTokenizer

    path = hf_dir / "tokenizer.json"
    data = _read_json(path)
    if data is None:
        raise ConvertError(f"{path}: not a JSON object")
    model = _obj(data.get("model"))
    is_byte_level = any(step.get("type") == "ByteLevel" for step in _walk_pre(data.get("pre_tokenizer")))
    if model.get("type") != "BPE" or not is_byte_level:
        raise ConvertError(f"{path}: only byte-level BPE tokenizer.json files are supported "
                           f"(model {str(model.get('type'))[:40]!r}); SentencePiece models need tokenizer.model")
    hf = _tokenizers_call(path, "cannot load", HFTokenizer.from_file, str(path))
    vocab = _tokenizers_call(path, "cannot read the vocabulary", hf.get_vocab, with_added_tokens=True)
    vocab_size = n_vocab or len(vocab)
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConvertError(f"{path}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
    pre = detect_pre(data, path)

    added = {a["id"]: a for a in _objects(data.get("added_tokens")) if is_integer(a.get("id"))}
    config = _read_json(hf_dir / "tokenizer_config.json") or {}
    for key, a in _added_tokens_decoder(hf_dir, config).items():
        if int(key) not in added and isinstance(a.get("content"), str) and a["content"] in vocab:
            added[int(key)] = {"id": int(key), **a}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        info = added.get(i)
        if info is not None and info.get("content") == text:
            if parse_bool(info.get("normalized", True)) is False:
                # llama.cpp stores added tokens in their encoded-then-decoded form
                ids = _tokenizers_call(path, "cannot encode an added token", hf.encode, text,
                                       add_special_tokens=False).ids
                text = _tokenizers_call(path, "cannot decode an added token", hf.decode, ids,
                                        skip_special_tokens=False)
            if parse_bool(info.get("special")) or does_token_look_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    return tokens, types, pre, data


def _walk_pre(pre: dict | None):
    if not isinstance(pre, dict) or not pre:
        return []
    if pre.get("type") == "Sequence":
        return _objects(pre.get("pretokenizers"))
    return [pre]


def _merges(hf_dir: Path, tokenizer_json: dict | None) -> list[str]:
    merges = _obj(_obj(tokenizer_json).get("model")).get("merges")
    if isinstance(merges, list) and merges:
        if all(isinstance(m, str) for m in merges):
            return list(merges)
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in merges):
            raise ConvertError(f"{hf_dir / 'tokenizer.json'}: model.merges must be strings \"a b\" or pairs "
                               "[\"a\", \"b\"]")
        # pair form (transformers >= 4.45): spaces inside a part are stored as U+0120 like llama.cpp
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    path = hf_dir / "merges.txt"
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(_read_text(path, hf_dir).split("\n")):  # as a text file reads lines
        line = line.strip()
        if not line or (n == 0 and line.startswith("#")):
            continue
        parts = line.split()
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out


# --- special tokens, add_* flags, chat template (gguf-py SpecialVocab) -------------------------
def _content(entry) -> str | None:
    """The text of a special token entry in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _special_id(item: dict) -> str | None:
    return _obj(_obj(item).get("SpecialToken")).get("id")


def _sequence_id(item: dict) -> str | None:
    return _obj(_obj(item).get("Sequence")).get("id")


def _read_post_processor(post: dict, texts: dict[str, str | None], add: dict[str, bool], have_config: bool):
    """What a tokenizer.json post-processor says about BOS / EOS / SEP (as gguf-py reads it:
    RobertaProcessing adds all three; a simple TemplateProcessing is read for the single-sequence
    wrapping and for a separator between the two sequences of a pair)."""
    for proc in _objects(post.get("processors", [post])):
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


def _special_vocab(hf_dir: Path, n_vocab: int, tokenizer_json: dict | None):
    """(ids {kind: id}, add flags {kind: bool}, chat template str | list | None), like gguf-py's
    SpecialVocab: token texts from tokenizer_config.json (special_tokens_map.json fills gaps, an
    extension) resolved through tokenizer.json's added_tokens, then config.json's *_token_id."""
    config = _read_json(hf_dir / "tokenizer_config.json")
    special_map = _read_json(hf_dir / "special_tokens_map.json") or {}
    texts = {kind: _content((config or {}).get(f"{kind}_token")) or _content(special_map.get(f"{kind}_token"))
             for kind in _SPECIAL_KEYS}
    if config is not None:
        texts["bos"] = texts["bos"] or texts["cls"]
        texts["eos"] = texts["eos"] or texts["sep"]
    add: dict[str, bool] = {}
    if tokenizer_json and isinstance(tokenizer_json.get("post_processor"), dict):
        _read_post_processor(tokenizer_json["post_processor"], texts, add, config is not None)

    template = None
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        template = _read_text(jinja, hf_dir)
    elif (hf_dir / "chat_template.json").is_file():
        template = (_read_json(hf_dir / "chat_template.json") or {}).get("chat_template")
    if config is not None:
        template = config.get("chat_template", template)
        for kind in _SPECIAL_KEYS:
            flag = parse_bool(config.get(f"add_{kind}_token"))
            if flag is not None:
                add[kind] = flag
    if not isinstance(template, (str, list)):
        template = None

    ids: dict[str, int] = {}

    def set_id(kind: str, tid) -> None:
        if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n_vocab and kind not in ids:
            ids[kind] = tid

    added_tokens = _objects(_obj(tokenizer_json).get("added_tokens"))
    if config is not None:
        for kind, text in texts.items():
            if text is not None:
                set_id(kind, next((a.get("id") for a in added_tokens if a.get("content") == text), None))
    model_config = _read_json(hf_dir / "config.json") or {}
    for kind in _SPECIAL_KEYS:
        tid = model_config.get(f"{kind}_token_id")
        if tid is None and isinstance(model_config.get("text_config"), dict):
            tid = model_config["text_config"].get(f"{kind}_token_id")
        set_id(kind, tid)
    return ids, add, template


def _chat_template_kvs(template) -> list[KV]:
    if template is None:
        return []
    if isinstance(template, str):
        return [("tokenizer.chat_template", template, VT.STRING, None)]
    out, names, default = [], [], None
    for choice in template:
        if not isinstance(choice, dict):
            continue
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        text = choice.get("template")
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            default = text
        else:
            names.append(name)
            out.append((f"tokenizer.chat_template.{name}", text, VT.STRING, None))
    if names:
        out.append(("tokenizer.chat_templates", names, VT.ARRAY, VT.STRING))
    if default is not None:
        out.append(("tokenizer.chat_template", default, VT.STRING, None))
    return out


# --- entry point ------------------------------------------------------------------------------
def vocab_metadata(hf_dir: Path, n_vocab: int, flavor: str = "llama") -> list[KV]:
    """The ``tokenizer.*`` KVs for a HF model folder, in llama.cpp's order and value types.

    ``n_vocab`` is config.json's vocab_size: the vocabulary is padded to it with ``[PAD{i}]``
    tokens of type unused (5). ``flavor`` is the GGUF architecture, for what llama.cpp's converter of
    that family does differently (Gemma: no space prefix; Phi-3: its added-token types). Raises
    ConvertError (one line) when there is no usable tokenizer.
    """
    hf_dir = Path(hf_dir)
    n_vocab = int(n_vocab) if n_vocab else None
    kvs: list[KV] = []
    tokenizer_json = None
    if (hf_dir / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(hf_dir, n_vocab, flavor)
        if (hf_dir / "tokenizer.json").is_file():
            tokenizer_json = _read_json(hf_dir / "tokenizer.json")
        kvs += [("tokenizer.ggml.model", "llama", VT.STRING, None),
                ("tokenizer.ggml.pre", "default", VT.STRING, None),
                ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
                ("tokenizer.ggml.scores", np.asarray(scores, dtype=np.float32), VT.ARRAY, VT.FLOAT32),
                ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), VT.ARRAY, VT.INT32)]
        merges: list[str] = []
    elif (hf_dir / "tokenizer.json").is_file():
        tokens, types, pre, tokenizer_json = _bpe_vocab(hf_dir, n_vocab)
        merges = _merges(hf_dir, tokenizer_json)
        if not merges:
            raise ConvertError(f"{hf_dir / 'tokenizer.json'}: a byte-level BPE tokenizer without merges")
        kvs += [("tokenizer.ggml.model", "gpt2", VT.STRING, None),
                ("tokenizer.ggml.pre", pre, VT.STRING, None),
                ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
                ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), VT.ARRAY, VT.INT32)]
    else:
        raise ConvertError(f"{hf_dir}: no tokenizer (need tokenizer.model or tokenizer.json)")
    if merges:
        kvs.append(("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING))

    ids, add, template = _special_vocab(hf_dir, len(tokens), tokenizer_json)
    for kind, tid in ids.items():
        if _SPECIAL_KEYS.get(kind):
            kvs.append((_SPECIAL_KEYS[kind], int(tid), VT.UINT32, None))
    for kind in ("bos", "eos", "sep"):
        if kind in add:
            kvs.append((f"tokenizer.ggml.add_{kind}_token", bool(add[kind]), VT.BOOL, None))
    kvs += _chat_template_kvs(template)

    # LlamaModel.set_vocab extras
    config = _read_json(hf_dir / "tokenizer_config.json") or {}
    if flavor in _NO_SPACE_PREFIX and kvs[0][1] == "llama":
        kvs.append(("tokenizer.ggml.add_space_prefix", False, VT.BOOL, None))
    elif parse_bool(config.get("add_prefix_space")) is not None:
        kvs.append(("tokenizer.ggml.add_space_prefix", parse_bool(config["add_prefix_space"]), VT.BOOL, None))
    if n_vocab == 49152:  # llama.cpp: "granite small models" (and SmolLM) never get a BOS
        kvs = [kv for kv in kvs if kv[0] != "tokenizer.ggml.add_bos_token"]
        kvs.append(("tokenizer.ggml.add_bos_token", False, VT.BOOL, None))
    return kvs
