"""A tool's `parameters` schema as the reply's grammar reads it (gptcli.tools): its objects closed, as llama.cpp's
grammars read a schema, and its local references pointed to where the reply's schema holds it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gptcli.schema_width import DATA_KEYWORDS, NAMED_SCHEMAS, resolve


def closed(schema: Any) -> Any:
    """A copy of `schema` whose objects that name their properties take no others unless they say so, as
    llama.cpp's grammars read a schema (JSON Schema allows any: a small model copies the schema into them); a
    property it requires but does not describe is named too, any value (closed without it: unsatisfiable).

    The parts of an `allOf` describe one object, as llama.cpp merges them, and so do the choices of an
    `anyOf` or `oneOf` beside the object's own properties: each part stays open (closed, a base's properties
    would refuse an extension's), and the object they make takes the properties they name together; a part
    that is a local `$ref` (OpenAPI's base schema) is copied in, as the part it is. The choices of an object
    that names no properties of its own are whole objects, each closed."""
    return _closed(schema, schema, part=False, copying=frozenset())


def _closed(node: Any, root: Any, *, part: bool, copying: frozenset[str]) -> Any:
    if isinstance(node, list):
        return [_closed(item, root, part=False, copying=copying) for item in node]
    if not isinstance(node, dict):
        return node
    copy: dict[str, Any] = {}
    for key, value in node.items():
        if key in NAMED_SCHEMAS and isinstance(value, dict):
            copy[key] = {name: _closed(item, root, part=False, copying=copying) for name, item in value.items()}
        elif key in _part_keys(node) and isinstance(value, list):
            copy[key] = [_closed(item, root, part=True, copying=seen) for item, seen in _copied(value, root, copying)]
        else:
            copy[key] = value if key in DATA_KEYWORDS else _closed(value, root, part=False, copying=copying)
    parts = list(_parts(copy))
    if part or not any("properties" in p for p in parts) or not isinstance(copy.get("properties", {}), dict):
        return copy  # (properties that are not an object: not a schema, which the check after closing says)
    if any("patternProperties" in p or p.get("additionalProperties", False) is not False for p in parts):
        return copy
    named = {name: {} for p in parts for name in _named(p)}
    if len(parts) > 1 or named.keys() - copy.get("properties", {}).keys():
        # the parts' properties, and a required one left unnamed (any value), named here too, so that
        # additionalProperties lets them through: closing never makes a schema unsatisfiable
        copy["properties"] = {**named, **copy.get("properties", {})}
    copy["additionalProperties"] = False
    return copy


def _copied(parts: list[Any], root: Any, copying: frozenset[str]) -> Iterator[tuple[Any, frozenset[str]]]:
    """An object's parts, each with what a local `$ref` points at copied in (once per reference: a cycle stays
    one), and the references copied on the way to it."""
    for part in parts:
        ref = part.get("$ref") if isinstance(part, dict) else None
        target = resolve(root, ref) if isinstance(ref, str) and ref.startswith("#") and ref not in copying else None
        if isinstance(target, dict):  # else as it is: llguidance names a reference that points at nothing
            yield {**target, **{key: value for key, value in part.items() if key != "$ref"}}, copying | {ref}
        else:
            yield part, copying


def _named(schema: dict[str, Any]) -> list[str]:
    """The properties a schema names: those it describes, and those it requires (a required one it does not
    describe takes any value)."""
    described = list(schema["properties"]) if isinstance(schema.get("properties"), dict) else []
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return described + [name for name in required if isinstance(name, str)]


def _part_keys(schema: dict[str, Any]) -> tuple[str, ...]:
    """The keywords whose schemas are parts of this object: allOf's, and the choices beside its own properties
    (each a rule on the same object, such as {"properties": {"kind": {"const": "x"}}, "required": ["a"]})."""
    return ("allOf", "anyOf", "oneOf") if "properties" in schema else ("allOf",)


def _parts(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schema and the parts it is made of, theirs too."""
    yield schema
    for key in _part_keys(schema):
        parts = schema.get(key)
        for part in parts if isinstance(parts, list) else ():  # else not a schema: the check says so
            if isinstance(part, dict):
                yield from _parts(part)


def rebased(schema: Any, root: str, named: bool = False) -> Any:
    """A copy of `schema` whose local references (`#`, `#/...`) point under `root`."""
    if isinstance(schema, list):
        return [rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if named:  # {name: schema}: a property may be named "type" or "format"
        return {name: rebased(item, root) for name, item in schema.items()}
    copy: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            copy[key] = root + value[1:]
        else:
            copy[key] = value if key in DATA_KEYWORDS else rebased(value, root, named=key in NAMED_SCHEMAS)
    return copy
