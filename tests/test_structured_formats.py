"""JSON Schema `format` in structured output: the formats llguidance implements are enforced, any other is an
annotation (JSON Schema 2020-12's default), as pydantic writes them ("path", "binary", "password") and OpenAPI
("int32", "int64"): it was an error, "Unknown format: path"."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gptcli import constraints
from tests.conftest import reads, run_cli

PYDANTIC = {  # pydantic's schema of a model with a Path, bytes, a SecretStr (each Field(max_length=8)) and an int
    "type": "object",
    "properties": {
        "path": {"format": "path", "maxLength": 8, "title": "Path", "type": "string"},
        "data": {"format": "binary", "maxLength": 8, "title": "Data", "type": "string"},
        "key": {"format": "password", "maxLength": 8, "title": "Key", "type": "string", "writeOnly": True},
        "count": {"format": "int32", "title": "Count", "type": "integer"},
    },
    "required": ["path", "data", "key", "count"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("fmt", ["path", "file-path", "binary", "password", "ipv4network", "int64", "uri-reference"])
def test_an_unknown_format_is_an_annotation_any_string_of_its_schema(fmt):
    constraint = constraints.schema_constraint({"type": "string", "format": fmt, "maxLength": 9}, "--json-schema")
    assert reads(constraint, '"/tmp/a b"') and reads(constraint, '"anything"')
    assert not reads(constraint, "3") and not reads(constraint, '"much too long"')  # the rest of it holds


def test_a_pydantic_models_formats_leave_each_property_its_type():
    constraint = constraints.schema_constraint(PYDANTIC, "--json-schema")
    assert reads(constraint, '{"path": "/tmp/x", "data": "AAE=", "key": "s3cret", "count": 3}')
    assert not reads(constraint, '{"path": "/tmp/x", "data": "AAE=", "key": "s3cret", "count": "3"}')
    untyped = constraints.schema_constraint({"format": "int64"}, "--json-schema")  # any JSON, as without it
    assert reads(untyped, "12") and reads(untyped, '"12"')


@pytest.mark.parametrize(
    "fmt, good, bad",
    [
        ("date-time", '"2024-05-06T07:08:09Z"', '"yesterday"'),
        ("date", '"2024-05-06"', '"2024-13-45x"'),
        ("email", '"ada@example.com"', '"not an address"'),
        ("uuid", '"123e4567-e89b-12d3-a456-426614174000"', '"123"'),
        ("ipv4", '"10.0.0.1"', '"10.0.0"'),
    ],
)
def test_a_format_llguidance_implements_is_still_enforced(fmt, good, bad):
    constraint = constraints.schema_constraint({"type": "string", "format": fmt}, "--json-schema")
    assert reads(constraint, good) and not reads(constraint, bad)


def test_each_format_we_enforce_is_one_llguidance_implements():
    """The list is llguidance's (another is its 'Unknown format: X'): one it dropped would be refused again."""
    import llguidance

    from gptcli.schema_width import ENFORCED_FORMATS

    for fmt in sorted(ENFORCED_FORMATS):
        source = json.dumps({"type": "string", "format": fmt})
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_json_schema(source)
        )
        assert not failed, (fmt, messages)


def test_only_the_keyword_is_dropped_not_a_property_named_format():
    schema = {
        "type": "object",
        "properties": {"format": {"type": "string", "format": "email"}, "p": {"type": "string", "format": "path"}},
        "required": ["format", "p"],
        "additionalProperties": False,
    }
    constraint = constraints.schema_constraint(schema, "--json-schema")
    assert reads(constraint, '{"format": "a@b.co", "p": "x"}')
    assert not reads(constraint, '{"format": "nope", "p": "x"}')  # the property's own format still holds
    assert json.loads(constraint.source) == schema  # the schema kept as given: the model is shown its formats


def test_a_keyword_we_cannot_enforce_is_still_refused():
    with pytest.raises(Exception, match="keyword not supported: uniqueItems"):
        constraints.schema_constraint({"type": "array", "uniqueItems": True, "format": "path"}, "--json-schema")


def test_cli_json_schema_of_a_pydantic_model_follows_it(tiny_models, tmp_path):
    schema = tmp_path / "save.json"
    schema.write_text(json.dumps(PYDANTIC), encoding="utf-8")
    model = str(tiny_models["llama"])
    out = run_cli("generate", "Save it:", "-m", model, "--json-schema", str(schema), "-t", "0.8", "--seed", "1")
    assert out.returncode == 0, out.stderr.decode()
    jsonschema.validate(json.loads(out.stdout), PYDANTIC)
