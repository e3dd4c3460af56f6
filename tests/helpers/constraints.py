"""Grammars and JSON schemas the structured-output tests generate under, each bounded (lengths, counts,
ranges) so that any path through it ends: (GBNF, the Python regex its texts must fully match), and JSON
schemas covering nested objects, enums, arrays with bounds, patterns, anyOf, nullable types and $refs."""
from __future__ import annotations

GBNF = [
    ('root ::= "yes" | "no"', r"yes|no"),
    ('root ::= [0-9]{3} "-" [0-9]{4}', r"[0-9]{3}-[0-9]{4}"),
    ('root ::= "(" [a-z]{1,8} ")" ("," " "? "(" [a-z]{1,8} ")"){0,3}', r"\([a-z]{1,8}\)(, ?\([a-z]{1,8}\)){0,3}"),
    ('root ::= greeting " " name "!"\ngreeting ::= "Hello" | "Hi" | "Hey"\nname ::= [A-Z] [a-z]{1,6}',
     r"(Hello|Hi|Hey) [A-Z][a-z]{1,6}!"),
    ('# a comment\nroot ::= item item? item? item?\nitem ::= "- " [a-zA-Z ]{1,10} "\\n"',
     r"(- [a-zA-Z ]{1,10}\n){1,4}"),
    ('root ::= "[" ( num ( ", " num ){0,4} )? "]"\nnum ::= "-"? [1-9] [0-9]{0,2}',
     r"\[(-?[1-9][0-9]{0,2}(, -?[1-9][0-9]{0,2}){0,4})?\]"),
    ('root ::= [^"\\n]{1,12}', r'[^"\n]{1,12}'),
    ('root ::= "caf" "\\u00e9" | "日本" [語人]', r"café|日本[語人]"),
]

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["color"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                           "maxItems": 3}},
                 "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer",
                                                                                    "minimum": 1, "maximum": 99}},
                "required": ["kind", "r"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer",
                                                                                       "minimum": 1, "maximum": 99}},
                "required": ["kind", "side"], "additionalProperties": False}]},
    {"type": "object", "properties": {"note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["note"], "additionalProperties": False},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 3},
]
