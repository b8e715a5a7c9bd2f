"""Structured output as it is asked for: the CLI's flags (`from_flags`), OpenAI's `response_format`, and the fields
vLLM's and llama-server's clients send (`requested_output`), in a server request or a batch line; each is checked
into an `OutputConstraint` that gptcli.constraints compiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptcli.config import OutputConstraint
from gptcli.constraints import (
    ANY_JSON,
    JSON_OBJECT,
    SCHEMA_HINT,
    choice,
    grammar_text,
    json_schema,
    regex,
    schema_constraint,
)
from gptcli.errors import ConfigError, FieldError, ResponseFormatError, UsageError
from gptcli.textio import GRAMMAR_FILE, SCHEMA_FILE, read_text_file

FORMATS = ("text", "json")  # the values of --format


def from_flags(
    schema_file: Path | None, output_format: str | None, pattern: str | None, grammar_file: Path | None = None
) -> OutputConstraint | None:
    """`--json-schema FILE`, `--format json|text`, `--regex PATTERN`, `--grammar FILE` (at most one) as a
    constraint, or None."""
    flags = (("--json-schema", schema_file), ("--format", output_format), ("--regex", pattern))
    given = [flag for flag, value in (*flags, ("--grammar", grammar_file)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} cannot be used together", hint="pick one kind of structured output")
    if schema_file is not None:
        return json_schema(read_text_file(schema_file, SCHEMA_FILE), str(schema_file))
    if pattern is not None:
        return regex(pattern)
    if grammar_file is not None:
        return grammar_text(read_text_file(grammar_file, GRAMMAR_FILE), str(grammar_file))
    if output_format is not None and output_format not in FORMATS:
        raise UsageError(f"--format: unknown format '{output_format}'", hint="use --format json (or text)")
    return ANY_JSON if output_format == "json" else None


RESPONSE_FORMATS = ("text", "json_object", "json_schema")
JSON_SCHEMA_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "name": (str, "a string"),
    "description": (str, "a string"),
    "schema": ((dict, bool), "a JSON Schema (an object)"),
    "strict": (bool, "true or false"),
}
SHAPE = "response_format takes type and, for type json_schema, json_schema: {name, schema, strict}"


def response_format_mismatch(value: dict[str, Any]) -> tuple[str, str] | None:
    """The field of OpenAI's `response_format` that does not fit its documented shape, and why, as
    (".json_schema", "..."); None when it fits. A field given as null counts as not given. llama-server's
    extension, the schema beside the type (`{"type": "json_object", "schema": {...}}`), fits too."""
    given = {key: item for key, item in value.items() if item is not None}
    kind = given.get("type")
    if kind not in RESPONSE_FORMATS:
        return ".type", "must be text, json_object or json_schema"
    if extra := next((key for key in given if key not in ("type", "json_schema", "schema")), None):
        return f".{extra}", f"not a field of response_format ({SHAPE})"
    spec = given.get("json_schema")
    if "schema" in given:
        if kind == "text":
            return ".schema", "not for type text: set type to json_schema"
        if spec is not None:
            return ".schema", "give the schema once, in json_schema.schema"
        kinds, says = JSON_SCHEMA_FIELDS["schema"]
        return None if isinstance(given["schema"], kinds) else (".schema", f"must be {says}")
    if kind != "json_schema":
        if spec is None:
            return None
        return ".json_schema", f"only for type json_schema, not {kind}: set type to json_schema or drop json_schema"
    if not isinstance(spec, dict) or spec.get("schema") is None:
        where = ".json_schema" if not isinstance(spec, dict) else ".json_schema.schema"
        return where, "required for type json_schema (the JSON Schema goes in json_schema.schema)"
    for key, item in spec.items():
        if key not in JSON_SCHEMA_FIELDS:
            return f".json_schema.{key}", f"not a field of json_schema ({SHAPE})"
        kinds, says = JSON_SCHEMA_FIELDS[key]
        if item is not None and not isinstance(item, kinds):
            return f".json_schema.{key}", f"must be {says}"
    return None


def response_format_schema(value: dict[str, Any]) -> tuple[str, Any] | None:
    """Where a fitting `response_format`'s JSON Schema is (".json_schema.schema", or llama-server's ".schema")
    and the schema; None when it has none (text, or any JSON object)."""
    if value.get("schema") is not None:
        return ".schema", value["schema"]
    if value.get("type") == "json_schema":
        return ".json_schema.schema", value["json_schema"]["schema"]
    return None


def response_format_param(value: dict[str, Any] | None) -> str:
    """The field a 400 about a response_format's grammar names: where its JSON Schema is, else response_format."""
    if value is None or response_format_mismatch(value) is not None:
        return "response_format"
    found = response_format_schema(value)
    return "response_format" + (found[0] if found else "")


def response_format(value: Any, where: str) -> OutputConstraint | None:
    """OpenAI's `response_format` (a request, a batch line) as a constraint; ResponseFormatError names a bad field."""
    if not isinstance(value, dict):
        raise ResponseFormatError(f"{where}: must be an object ({SHAPE})", where, SCHEMA_HINT)
    if mismatch := response_format_mismatch(value):
        raise ResponseFormatError(f"{where}{mismatch[0]}: {mismatch[1]}", f"{where}{mismatch[0]}", SCHEMA_HINT)
    if value["type"] == "text":
        return None
    if (found := response_format_schema(value)) is None:
        return JSON_OBJECT
    param = f"{where}{found[0]}"
    try:
        return schema_constraint(found[1], param)
    except ConfigError as exc:
        raise ResponseFormatError(exc.message, param, hint=exc.hint) from None


# vLLM's `structured_outputs` (0.10 on): one kind of output, and options; those it defines that we do not implement
# are refused by name, not ignored. `disable_fallback` (we have no other backend to fall back from) and
# `disable_any_whitespace` (JSON never has free whitespace here) are accepted and change nothing.
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
STRUCTURED_OPTIONS = ("disable_fallback", "disable_any_whitespace")
STRUCTURED_REFUSED = ("disable_additional_properties", "whitespace_pattern", "structural_tag")
# One kind each: vLLM's older fields (before structured_outputs), and llama-server's.
KIND_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
    "json_schema": "json",
    "grammar": "grammar",
}
OUTPUT_FIELDS = ("structured_outputs", *KIND_FIELDS)
IGNORED_FIELDS = ("guided_decoding_backend", "guided_whitespace_pattern")  # vLLM's older options: accepted
KINDS_SAID = "json, regex, choice, grammar or json_object"
ONE_KIND = "give one kind of structured output per request"


def asked_fields(fields: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """Each kind of structured output the fields ask for, as (its param, its kind, its value); a null counts as
    not given, and so does a false `json_object`, but a `structured_outputs` that names no kind is a FieldError
    (it would silently give free text)."""
    asked = [(name, kind, fields[name]) for name, kind in KIND_FIELDS.items() if fields.get(name) is not None]
    outputs = fields.get("structured_outputs")
    if outputs is None:
        return asked
    if not isinstance(outputs, dict):
        raise FieldError(f"structured_outputs: must be an object with one of {KINDS_SAID}", "structured_outputs")
    named = []
    for key, value in outputs.items():
        param = f"structured_outputs.{key}"
        if key in STRUCTURED_KINDS and value is not None and value is not False:
            named.append((param, key, value))
        elif key in STRUCTURED_REFUSED and value is not None and value is not False:
            raise FieldError(f"{param}: not supported by gptcli (it is vLLM's)", param, hint="drop it")
        elif key not in (*STRUCTURED_KINDS, *STRUCTURED_OPTIONS, *STRUCTURED_REFUSED):
            raise FieldError(f"{param}: not a field of structured_outputs ({KINDS_SAID})", param)
    if not any(outputs.get(key) is not None for key in STRUCTURED_KINDS):  # vLLM refuses it too: nothing asked
        message = f"structured_outputs: names no kind of structured output (give one of {KINDS_SAID})"
        raise FieldError(message, "structured_outputs", hint="or leave structured_outputs out for free text")
    return named + asked


def requested_output(fields: dict[str, Any], beside: str | None = None) -> tuple[str, OutputConstraint] | None:
    """The structured output a request's vLLM or llama-server fields ask for, checked, as (the param that asks,
    its constraint); None: none asked. `beside`: a field that already asks for one (a JSON response_format).
    FieldError names the field: a bad value, an option we do not implement, two kinds in one request."""
    asked = asked_fields(fields)
    if beside is not None:
        asked.insert(0, (beside, "", None))
    if len(asked) > 1:
        first, second = asked[0][0], asked[1][0]
        raise FieldError(f"{second}: goes with no other structured output ({first} is given)", second, ONE_KIND)
    if not asked or beside is not None:
        return None
    param, kind, value = asked[0]
    try:
        return param, _constraint(kind, value, param)
    except FieldError:
        raise
    except ConfigError as exc:
        raise FieldError(exc.message, param, hint=exc.hint) from None


def _constraint(kind: str, value: Any, param: str) -> OutputConstraint:
    if kind == "json":  # a JSON Schema, or its JSON text
        return json_schema(value, param) if isinstance(value, str) else schema_constraint(value, param)
    if kind == "json_object":
        if value is not True:
            raise FieldError(f"{param}: must be true or false", param)
        return JSON_OBJECT
    if kind == "regex":
        if not isinstance(value, str):
            raise FieldError(f"{param}: must be a regular expression (a string)", param)
        return regex(value, param)
    if kind == "choice":
        return choice(value, param)
    return grammar_text(value, param)


def beside_tools(param: str, format_field: str = "response_format") -> FieldError:
    """Structured output asked for beside tools, whose reply is JSON of its own. `format_field`: where the request
    gives the format of a reply that calls no tool (the Responses API's text.format)."""
    message = f"{param}: does not go with tools (a reply that may call tools is JSON of its own)"
    return FieldError(message, param, hint=f"give the format of a reply that calls no tool as a JSON {format_field}")
