"""`llmrun run` prompt sources (-f FILE, -p -), --stop, --grammar-file, --json-schema and the -v timing line;
`llmrun chat` dropping the oldest turns when the window fills (context shift)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema

from test_cli_run_chat import STATS, _llmrun, _one_line_error

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "rank"], "additionalProperties": False}


def test_prompt_file_stdin_and_stop(default_model, tmp_path):
    prompt = "Count with me: 1, 2, 3, 4,"
    (tmp_path / "prompt.txt").write_text(prompt)
    from_file = _llmrun("run", default_model, "-f", tmp_path / "prompt.txt", "--temp", "0", "-n", "12",
                        "--ctx", "128")
    from_stdin = _llmrun("run", default_model, "-p", "-", "--temp", "0", "-n", "12", "--ctx", "128", stdin=prompt)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    assert from_file.stdout == from_stdin.stdout and " 5" in from_file.stdout
    stopped = _llmrun("run", default_model, "-p", prompt, "--temp", "0", "-n", "12", "--ctx", "128",
                      "--stop", "7", "--stop", " 6")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == from_file.stdout[:from_file.stdout.index(" 6")] + "\n"


def test_grammar_file_and_json_schema(default_model, tmp_path):
    (tmp_path / "yn.gbnf").write_text('root ::= ("yes" | "no") "."\n')
    res = _llmrun("run", default_model, "-p", "Is water wet? Answer:", "--grammar-file", tmp_path / "yn.gbnf",
                  "--ctx", "128", "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"(yes|no)\.\n", res.stdout)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    for schema_arg in (json.dumps(SCHEMA), str(tmp_path / "schema.json")):
        res = _llmrun("run", default_model, "-p", "A city and its rank as JSON:", "--json-schema", schema_arg,
                      "--ctx", "256", "--seed", "2", "-n", "80")
        assert res.returncode == 0, res.stderr
        jsonschema.validate(json.loads(res.stdout), SCHEMA)


def test_bad_prompt_and_grammar_options_are_one_line_errors(default_model, tmp_path):
    (tmp_path / "bad.gbnf").write_text("root ::= missing_rule\n")
    for args in (["run", default_model],                                           # no prompt
                 ["run", default_model, "-p", "x", "-f", tmp_path / "bad.gbnf"],    # two prompts
                 ["run", default_model, "-p", "x", "--grammar-file", tmp_path / "bad.gbnf"],
                 ["run", default_model, "-p", "x", "--grammar-file", tmp_path / "nope.gbnf"],
                 ["run", default_model, "-p", "x", "--json-schema", '{"type": "wat"}'],
                 ["run", default_model, "-f", tmp_path / "missing.txt"]):
        _one_line_error(_llmrun(*args))


def test_verbose_timing_is_a_line_of_its_own(default_model):
    proc = subprocess.run([sys.executable, "-m", "llmrun.cli", "run", str(default_model), "-p", "The sky is",
                           "-n", "5", "--temp", "0", "-v", "--ctx", "128"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    timing = [i for i, line in enumerate(lines) if "generated 5 tokens" in line]
    assert len(timing) == 1 and lines[timing[0]].startswith("llmrun: prompt"), proc.stdout
    assert lines[timing[0] - 1].strip() and not lines[timing[0] - 1].startswith("llmrun:")   # the text, ended


def test_chat_drops_oldest_turns_when_the_window_fills(default_model):
    turns = [f"Tell me one short fact about the number {n}, please, in a sentence." for n in range(1, 9)]
    res = _llmrun("chat", default_model, "--temp", "0", "-n", "24", "--ctx", "192", "--system", "Be brief.",
                  stdin="\n".join(turns) + "\n")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    answered = STATS.findall(res.stderr)
    assert len(answered) == len(turns)                      # every turn answered, none refused
    assert "dropped the" in res.stderr and "/reset" not in res.stderr
    assert all(int(p) + 24 <= 192 for p, *_ in answered)
