"""Grammar masks (llmrun.text.grammar) over both tokenizer kinds, without a model: random logits are masked
and the arg-max taken, step after step, so every path the mask allows gets exercised. The decoded text is
checked with independent tools: Python regexes for GBNF grammars, `jsonschema` for JSON schemas, and the
exact first-step mask of a literal grammar computed from the vocabulary itself."""
from __future__ import annotations

import json
import re
import shutil

import jsonschema
import numpy as np
import pytest

from llmrun.convert.vocab import vocab_metadata
from llmrun.errors import LlmrunError
from llmrun.gguf import GGUFReader, GGUFWriter
from llmrun.text.grammar import Grammar, GrammarError, response_format_grammar
from llmrun.text.tokenizer import Tokenizer

from helpers.constraints import GBNF, SCHEMAS


@pytest.fixture(scope="module")
def bpe(default_model) -> Tokenizer:
    with GGUFReader(default_model) as r:
        return Tokenizer.from_metadata(r.metadata)


@pytest.fixture(scope="module")
def spm(tmp_path_factory, llama2_tokenizer_model) -> Tokenizer:
    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(llama2_tokenizer_model, folder / "tokenizer.model")
    w = GGUFWriter(folder / "vocab.gguf")
    w.add("general.architecture", "llama", 8)
    for key, value, vtype, etype in vocab_metadata(folder, 32000):
        w.add(key, value, vtype, etype)
    w.write()
    with GGUFReader(folder / "vocab.gguf") as r:
        return Tokenizer.from_metadata(r.metadata)


@pytest.fixture(params=["bpe", "spm"])
def tok(request, bpe, spm) -> Tokenizer:
    return bpe if request.param == "bpe" else spm


def walk(grammar: Grammar, tok: Tokenizer, seed: int, max_steps: int = 200) -> str:
    """Generate under the grammar with random logits (end tokens favoured once allowed); the text."""
    rng = np.random.default_rng(seed)
    m = grammar.matcher(tok)
    ends = np.array(sorted(tok.eog_ids))
    ids = []
    for _ in range(max_steps):
        logits = rng.standard_normal(tok.n_vocab).astype(np.float32)
        logits[ends] += 2.0
        m.mask_logits(logits)
        t = int(np.argmax(logits))
        if t in tok.eog_ids:
            assert m.is_accepting
            return tok.decode(ids).decode("utf-8")
        m.accept(t)
        ids.append(t)
    raise AssertionError(f"no end after {max_steps} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("grammar,regex", GBNF, ids=[f"g{i}" for i in range(len(GBNF))])
def test_gbnf_outputs_match_regex(tok, grammar, regex):
    g = Grammar.from_gbnf(grammar)
    for seed in range(4):
        text = walk(g, tok, seed)
        assert re.fullmatch(regex, text), (grammar, text)


def test_first_mask_of_a_literal_grammar_is_exact(tok):
    """Allowed first tokens = exactly those whose bytes are a non-empty prefix of an alternative."""
    words = [b"yes", b"no", b"maybe"]
    allowed = Grammar.from_gbnf('root ::= "yes" | "no" | "maybe"').matcher(tok).allowed()
    special = {i for i, t in enumerate(tok.token_types) if t in (2, 3)}   # unknown / control
    expected = np.array([i not in special and bool(p := tok.token_to_piece(i, special=True))
                         and any(w.startswith(p) for w in words) for i in range(tok.n_vocab)])
    assert expected.sum() >= 3
    assert np.array_equal(allowed, expected)


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"s{i}" for i in range(len(SCHEMAS))])
def test_json_schema_outputs_validate(tok, schema):
    g = Grammar.from_json_schema(schema)
    for seed in range(4):
        text = walk(g, tok, seed, max_steps=300)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode(tok):
    text = walk(response_format_grammar({"type": "json_object", "schema": SCHEMAS[0]}), tok, 0)
    jsonschema.validate(json.loads(text), SCHEMAS[0])
    g = response_format_grammar({"type": "json_object"})
    assert g.kind == "json_object"
    assert g.matcher(tok).allowed()[[i for i in range(tok.n_vocab) if tok.token_to_piece(i) == b"["]].sum() == 0


def test_response_format_shapes():
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    g = response_format_grammar({"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": SCHEMAS[2], "strict": True}})
    assert g.kind == "json_schema"
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {"type": "json_schema", "json_schema": 3}):
        with pytest.raises(GrammarError):
            response_format_grammar(bad)


@pytest.mark.parametrize("bad", [
    'root ::= missing', 'root ::= [a-', 'root ::= "unterminated', '', 'not a grammar at all', 'root ::= ((("a"',
    "root ::= " + "(" * 5000 + '"a"' + ")" * 5000,
])
def test_bad_gbnf_is_one_line_error(bad):
    with pytest.raises(GrammarError) as e:
        Grammar.from_gbnf(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


@pytest.mark.parametrize("bad", [
    {"type": "wat"}, '{"type": ', [1, 2], {"properties": {"a": {"$ref": "#/nope"}}}, {"minLength": "x"},
    {"type": "string", "pattern": "(unclosed"}, 42,
])
def test_bad_schema_is_one_line_error(bad):
    with pytest.raises(LlmrunError) as e:
        Grammar.from_json_schema(bad)
    assert "\n" not in str(e.value)


def test_too_large_grammar_is_refused():
    with pytest.raises(GrammarError, match="too large"):
        Grammar.from_gbnf('root ::= "' + "a" * 600_000 + '"')


def test_mask_covers_padded_logit_rows(bpe):
    m = Grammar.from_gbnf('root ::= "yes"').matcher(bpe)
    row = np.zeros(bpe.n_vocab + 64, dtype=np.float32)
    m.mask_logits(row)
    assert np.isneginf(row[bpe.n_vocab:]).all() and np.isfinite(row).sum() >= 1


def test_rejected_token_is_error(bpe):
    m = Grammar.from_gbnf('root ::= "yes"').matcher(bpe)
    with pytest.raises(GrammarError):
        m.accept(bpe.encode("no", add_bos=False)[0])


def test_any_tokenizer_like_works():
    """A tokenizer with only protocols.py's TokenizerLike methods (no token types) gets masks too."""
    from helpers.fake_llm import ByteTokenizer
    tok = ByteTokenizer()
    assert not hasattr(tok, "token_types")
    for seed in range(3):
        assert re.fullmatch(GBNF[1][1], walk(Grammar.from_gbnf(GBNF[1][0]), tok, seed))


@pytest.mark.parametrize("make", [lambda: Grammar.from_gbnf("root ::= root"),
                                  lambda: Grammar.from_json_schema({"$ref": "#"}),
                                  lambda: Grammar.from_json_schema({"allOf": [{"$ref": "#"}]})])
def test_grammar_matching_nothing_is_one_line_error(bpe, make):
    with pytest.raises(GrammarError) as e:
        make().matcher(bpe).allowed()
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


@pytest.mark.parametrize("make", [lambda: Grammar.from_gbnf('root ::= "a"{1000000}'),
                                  lambda: Grammar.from_gbnf("root ::= [a-z]{1,100000000}"),
                                  lambda: Grammar.from_json_schema({"type": "array", "minItems": 1000000}),
                                  lambda: Grammar.from_json_schema({"type": "string",
                                                                    "pattern": "(a|aa)*(b{1,1000}){1,1000}"})])
def test_huge_bounds_stay_lazy(bpe, make):
    """Large repetition counts are not expanded up front: the first mask comes straight away."""
    assert make().matcher(bpe).allowed().any()
