"""Structured output as it is asked for: the CLI's flags (`from_flags`) and OpenAI's `response_format` (a server
request, a batch line), each checked into an `OutputConstraint` that gptcli.constraints compiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptcli.config import OutputConstraint
from gptcli.constraints import ANY_JSON, JSON_OBJECT, SCHEMA_HINT, grammar_text, json_schema, regex, schema_constraint
from gptcli.errors import ConfigError, ResponseFormatError, UsageError
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
