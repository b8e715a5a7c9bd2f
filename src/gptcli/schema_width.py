"""The JSON objects of a schema too wide for llguidance's parser, found before any token is generated.

llguidance keeps every choice open at one point of the text in one Earley row, at most 2,000 items:
an object's run of optional properties costs ~4 items each, so ~500 of them fail, but only once the
text reaches that object's `{`. The tokenizer-free check compiles the whole grammar yet parses no text,
and the first-mask check reaches only the top level; an array of wide objects failed mid-reply.

So each wide object anywhere in the schema (under items, properties, $defs, anyOf, ...) is parsed on
its own by a one-byte-per-token matcher up to its `{`, and the row there is the row the reply would
meet. Past a required property the next run of optional ones opens a row of its own, so each run is
probed as an object of its own; choices (anyOf, oneOf, allOf) whose objects open many properties at
one `{` together are probed whole, each local `$ref` it holds copied into its own `$defs` (wherever the
reference points: `#/$defs/...` or `#/parts/a`). A probe that still cannot compile alone is skipped.

And the `format`s llguidance does not implement ("Unknown format: path"), dropped before it compiles a schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import numpy as np

from gptcli.errors import ConfigError

TOO_WIDE = re.compile(r"Current row has (\d+) items; max is (\d+)")
WIDE = 100  # properties in one run before it is worth a probe (a probe of 1,000 takes ~80 ms)
# The keywords whose values are data, not schemas, and those whose values map names to schemas.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "required", "type", "pattern", "format"})
CHOICES = ("anyOf", "oneOf", "allOf")
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# The string formats llguidance enforces (1.9: any other is "Unknown format: X"). In JSON Schema 2020-12 a
# `format` is an annotation unless a validator implements it: pydantic writes "path", "binary", "password",
# OpenAPI "int32", so another one is dropped (the value is then any string, or number, of its schema).
ENFORCED_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid", "unknown"}
)


# Arrays and objects in one another: serde_json's limit is 128, and llguidance reads a schema 3 levels inside
# its grammar's JSON (`{"grammars": [{"json_schema": ...}]}`), so a schema 125 deep already failed there with
# serde's "recursion limit exceeded at line 1 column N" (a column of text the user never wrote).
MAX_DEPTH = 124


def check_depth(schema: Any, where: str) -> None:
    """A ConfigError naming `where` for a schema nested past MAX_DEPTH, found without recursion: llguidance
    refuses it anyway, and the walks of it here (a tool's objects closed, formats dropped) ran past Python's
    recursion limit (a RecursionError for a schema some 500 lists deep: a 500 on the server)."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: nested too deeply to be a usable JSON Schema (over {MAX_DEPTH} arrays and objects deep)",
                hint="describe a recursive structure with a $ref to its own $defs entry",
            )
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))


# The integers llguidance's bounds hold (i64): a bound past them was clamped to 2**63 - 1, and a reply of
# 9223372036854775807 then passed for a match of {"minimum": 1e20}.
INTEGER_RANGE = (-(2**63), 2**63 - 1)
BOUND_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def check_integer_bounds(schema: Any, where: str) -> None:
    """A ConfigError naming the keyword for an integer's bound past the 64-bit range llguidance enforces (walked
    without recursion: check_depth bounds the nesting first)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "integer" or (isinstance(kind, list) and "integer" in kind):
                for keyword in BOUND_KEYWORDS:
                    bound = node.get(keyword)
                    number = isinstance(bound, (int, float)) and not isinstance(bound, bool)
                    if number and not INTEGER_RANGE[0] <= bound <= INTEGER_RANGE[1]:
                        raise ConfigError(
                            f"{where}: {keyword} {bound} is past the 64-bit integers structured output can"
                            " enforce (-2**63 to 2**63 - 1)",
                            hint="keep integer bounds within that range, or use a string with a pattern",
                        )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def too_wide(message: str) -> tuple[str, str] | None:
    """The (items, limit) of llguidance's "Current row has N items; max is M", or None for another message."""
    row = TOO_WIDE.search(message)
    return (row.group(1), row.group(2)) if row else None


def enforced_formats(schema: Any, named: bool = False) -> Any:
    """A copy of `schema` without the `format`s llguidance does not enforce (annotations: see ENFORCED_FORMATS);
    the one form of a schema that llguidance compiles (constraints.grammar) and probes (first_too_wide) read."""
    if isinstance(schema, list):
        return [enforced_formats(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy: dict[str, Any] = {}
    for key, value in schema.items():
        if named:  # {name: schema}: a property may be named "format"
            copy[key] = enforced_formats(value)
        elif key == "format" and isinstance(value, str) and value not in ENFORCED_FORMATS:
            continue
        else:
            copy[key] = value if key in DATA_KEYWORDS else enforced_formats(value, named=key in NAMED_SCHEMAS)
    return copy


def first_too_wide(schema: Any, options: dict[str, Any]) -> tuple[str, str, str] | None:
    """(items, limit, where) of the first object run in `schema` that llguidance cannot open, or None."""
    try:
        for where, probe in _runs(schema, "", root=schema):
            row = too_wide(_error_after_open(json.dumps(_self_contained(probe, schema)), options))
            if row:
                return row[0], row[1], where or "/"
    except RecursionError:  # nested deeper than Python walks: the decoding still says so if it fails
        pass
    return None


def _runs(node: Any, where: str, root: Any, named: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(JSON pointer, object schema) for each wide run of optional properties in the schema (and the
    required property closing it, if any, as an object of its own with the same additionalProperties),
    and each choice (anyOf, oneOf, allOf) whose objects open that many properties at one `{` together."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _runs(item, f"{where}/{i}", root)
        return
    if not isinstance(node, dict):
        return
    if not named and any(key in node for key in CHOICES) and _open_at_brace(node, root, set()) >= WIDE:
        yield where, node
    properties = node.get("properties") if not named else None
    if isinstance(properties, dict) and len(properties) >= WIDE:
        required = set(node["required"]) if isinstance(node.get("required"), list) else set()
        extra = {"additionalProperties": node["additionalProperties"]} if "additionalProperties" in node else {}
        run: dict[str, Any] = {}
        for name, value in properties.items():
            run[name] = value
            if name in required or len(run) == len(properties):
                if len(run) >= WIDE:
                    closed = {"required": [name]} if name in required else {}
                    yield where, {"type": "object", "properties": run, **closed, **extra}
                run = {}
    for key, value in node.items():
        if named or key not in DATA_KEYWORDS:
            yield from _runs(value, f"{where}/{_escape(key)}", root, named=not named and key in NAMED_SCHEMAS)


def _self_contained(probe: dict[str, Any], root: Any) -> dict[str, Any]:
    """The probe with each local `$ref` ("#/$defs/row", "#/parts/a", "#") pointed at a copy of its target
    in the probe's own `$defs`, so that it compiles alone (a `$ref` it cannot resolve stays as it is)."""
    defs: dict[str, Any] = {}
    names: dict[str, str] = {}

    def target(ref: str) -> str:
        if ref not in names:
            found = resolve(root, ref)
            if found is None:
                return ref
            names[ref] = f"ref{len(names)}"  # named before its target is copied: a recursive $ref ends here
            defs[names[ref]] = rewrite(found, named=False)
        return f"#/$defs/{names[ref]}"

    def rewrite(node: Any, named: bool) -> Any:
        if isinstance(node, list):
            return [rewrite(item, named=False) for item in node]
        if not isinstance(node, dict):
            return node
        if named:  # {name: schema}: the names are data
            return {key: rewrite(value, named=False) for key, value in node.items()}
        copied: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                copied[key] = target(value)
            elif key in DATA_KEYWORDS:
                copied[key] = value
            else:
                copied[key] = rewrite(value, named=key in NAMED_SCHEMAS)
        return copied

    contained = rewrite(probe, named=False)
    return {**contained, "$defs": defs} if defs else contained


def _open_at_brace(node: Any, root: Any, seen: set[str]) -> int:
    """How many properties a `{` of this schema may open: its own, its choices' and what it refers to."""
    if not isinstance(node, dict):
        return 0
    count = len(node["properties"]) if isinstance(node.get("properties"), dict) else 0
    for key in CHOICES:
        if isinstance(node.get(key), list):
            count += sum(_open_at_brace(member, root, seen) for member in node[key])
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and ref not in seen:  # a local reference, followed once
        seen.add(ref)
        count += _open_at_brace(resolve(root, ref), root, seen)
    return count


def resolve(root: Any, ref: str) -> Any:
    """The schema a local `$ref` points at ("#/$defs/item", a JSON pointer in a URI fragment, or "#item",
    a schema's `$anchor`), or None."""
    if ref != "#" and not ref.startswith("#/"):
        return next(_anchored(root, unquote(ref[1:])), None)
    node = root
    for part in ref.removeprefix("#").split("/")[1:]:
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _anchored(node: Any, anchor: str, named: bool = False) -> Iterator[dict[str, Any]]:
    """The schemas under `node` whose `$anchor` is `anchor` (data keywords' values are not schemas)."""
    if isinstance(node, list):
        for item in node:
            yield from _anchored(item, anchor)
    elif isinstance(node, dict):
        if not named and node.get("$anchor") == anchor:
            yield node
        for key, value in node.items():
            if named or key not in DATA_KEYWORDS:
                yield from _anchored(value, anchor, named=not named and key in NAMED_SCHEMAS)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


@lru_cache(maxsize=1)
def _bytes_tokenizer() -> Any:
    """A token table of the 256 bytes and an end token: any text is reachable one byte at a time."""
    import llguidance

    encoder = {bytes([b]): b for b in range(256)}
    return llguidance.LLTokenizer.from_tiktoken(
        encoder=encoder, special_tokens={"<|end|>": 256}, pattern=".", eos_token=256, slices=[]
    )


def _error_after_open(schema_source: str, options: dict[str, Any]) -> str:
    """llguidance's error once an object's `{` is read (if the schema allows one there), or ""."""
    import llguidance

    tokenizer = _bytes_tokenizer()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_source, defaults=options)
    except ValueError as exc:
        return str(exc)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    bits = np.zeros((tokenizer.vocab_size + 31) // 32, dtype=np.int32)  # held by a name while the calls write it
    matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
    if not matcher.is_error() and matcher.consume_token(ord("{")):
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
    return (matcher.get_error() or "") if matcher.is_error() else ""
