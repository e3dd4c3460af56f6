"""Terminal escape injection (issue 10, defect 7): strings from files -- metadata values and keys, tensor names,
template error messages, generated text on a terminal -- never reach the terminal as control characters."""
from __future__ import annotations

import io

import numpy as np
from click.testing import CliRunner

from helpers.tiny_files import model_metadata, model_tensors, tiny_vocab, write_model
from llmrun.cli import main
from llmrun.gguf import GGUFValueType as VT
from llmrun.safe_text import printable, terminal_text

CLIPBOARD = "\x1b]52;c;ZXZpbA==\x07"     # OSC 52: write the clipboard
CLEAR = "\x1b[2J"


def _no_controls(text: str) -> None:
    bad = [c for c in text if (ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) < 0xA0 or c in "\u202e\u2028"]
    assert not bad, repr(text[:200])


def test_info_escapes_names_keys_and_values(tmp_path):
    tensors = model_tensors(len(tiny_vocab()[0]))
    tensors["blk.0.\x1b[2Jx.weight"] = np.ones(4, np.float32)
    p = write_model(tmp_path / "evil.gguf", tensors=tensors, set_keys={
        "general.name": (CLIPBOARD + "name", VT.STRING, None),
        "general.architecture": ("llama" + CLEAR, VT.STRING, None),
        "x." + CLEAR + ".key": ("v\u202eevil", VT.STRING, None),
        "x.list": (["a" + CLEAR, "b\u2028c"], VT.ARRAY, VT.STRING)})
    for args in (["info", str(p)], ["info", str(p), "--json"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        _no_controls(res.stdout)
        assert "\\x1b]52" in res.stdout or "\\u001b]52" in res.stdout


def test_error_lines_are_escaped(tmp_path):
    meta = [kv for kv in model_metadata() if kv[0] != "tokenizer.chat_template"]
    p = write_model(tmp_path / "m.gguf", metadata=meta, set_keys={
        "tokenizer.chat_template": ("{{ raise_exception('\x1b[2J\x1b]52;c;eA==\x07 gotcha\\nsecond line') }}",
                                    VT.STRING, None)})
    res = CliRunner().invoke(main, ["chat", str(p)], input="hello\n")
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gotcha" in lines[0], res.stderr
    _no_controls(res.stderr)
    bad = write_model(tmp_path / "k.gguf", set_keys={"llama.embedding_length": ("\x1b[2J", VT.STRING, None)})
    res = CliRunner().invoke(main, ["run", str(bad), "-p", "x"])
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1
    _no_controls(res.stderr)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_generated_text_is_escaped_on_a_terminal_only(tmp_path):
    """A vocabulary may hold ESC sequences as tokens: what a chat prints on a terminal keeps newlines and tabs
    and escapes the rest; into a pipe the text stays raw."""
    from llmrun.cli.chat_session import ChatSession

    class FakeLlm:
        last_timings, n_cached = {}, 0

        def n_ctx(self):
            return 100

        def chat_tokens(self, messages):
            return [1]

        def create_chat_completion(self, messages, stream, **kw):
            yield {"choices": [{"delta": {"content": "ok\n\t" + CLEAR + CLIPBOARD}, "finish_reason": None}]}
            yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}

    for out, escaped in ((_Tty(), True), (io.StringIO(), False)):
        ChatSession(FakeLlm(), stdin=io.StringIO("hi\n"), stdout=out, stderr=io.StringIO()).run()
        text = out.getvalue()
        assert text.startswith("ok\n\t")
        assert (CLEAR not in text and "\\x1b[2J" in text) if escaped else CLEAR in text


def test_printable_helpers():
    assert printable("caf\u00e9 \u6771\u4eac") == "caf\u00e9 \u6771\u4eac"       # letters stay
    assert printable("a\x1b[2Jb\x00\x7f\x9b\u202e\u200b") == "a\\x1b[2Jb\\x00\\x7f\\x9b\\u202e\\u200b"
    assert printable("one\ntwo\r") == "one\\ntwo\\r"
    assert printable(b"\xff".decode("utf-8", "surrogateescape")) == "\\xff"
    assert terminal_text("a\n\tb\x1b") == "a\n\tb\\x1b"
