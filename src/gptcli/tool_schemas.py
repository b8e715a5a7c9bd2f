"""A tool's `parameters` schema as the reply's grammar reads it (gptcli.tools): its objects closed, as llama.cpp's
grammars read a schema, and its local references pointed to where the reply's schema holds it."""

from __future__ import annotations

from typing import Any

from gptcli.schema_width import DATA_KEYWORDS, NAMED_SCHEMAS


def closed(schema: Any) -> Any:
    """A copy of `schema` whose objects that name their properties take no others unless they say so, as
    llama.cpp's grammars read a schema (JSON Schema allows any: a small model copies the schema into them)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy: dict[str, Any] = {}
    for key, value in schema.items():
        if key in NAMED_SCHEMAS and isinstance(value, dict):
            copy[key] = {name: closed(item) for name, item in value.items()}
        else:
            copy[key] = value if key in DATA_KEYWORDS else closed(value)
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        copy["additionalProperties"] = False
    return copy


def rebased(schema: Any, root: str) -> Any:
    """A copy of `schema` whose local references (`#`, `#/...`) point under `root`."""
    if isinstance(schema, list):
        return [rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            copy[key] = root + value[1:]
        else:
            copy[key] = value if key in DATA_KEYWORDS else rebased(value, root)
    return copy
