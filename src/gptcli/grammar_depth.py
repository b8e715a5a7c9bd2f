"""How deep a grammar's references chain: rules naming rules (Lark), schemas reaching schemas (JSON Schema `$ref`).

llguidance compiles a grammar by recursion along those chains, on the calling thread's stack: a chain of some
3,000 Lark rules or 5,000 `$ref`s (a 180 KB file) overflows an 8 MiB stack, and the process dies of SIGSEGV,
the server with it. Such a chain is refused here first, long before that. Real grammars are far shallower
(an expression grammar's precedence levels are a few dozen rules).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from gptcli.schema_width import DATA_KEYWORDS, NAMED_SCHEMAS, resolve

MAX_CHAIN = 256  # at most ~6 KB of stack a link (an anyOf around a $ref): 1.5 MiB, inside any thread's stack

_RULE_START = re.compile(r"^\s*[?!]?([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)", re.M)
# What a rule's body holds besides names: string literals, /regexes/flags, comments.
_NOT_NAMES = re.compile(r'"(?:[^"\\\n]|\\.)*"i?|/(?![/*])(?:[^/\\\n]|\\.)+/[imslux]*|//[^\n]*|#[^\n]*')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JSON_DIRECTIVE = re.compile(r"%json\b\s*")  # llguidance's Lark: `%json { <a JSON Schema> }` embeds a schema


def longest_chain(starts: Iterable[Hashable], links: Callable[[Any], Iterable[Hashable]]) -> int:
    """The most nodes on a path that follows `links` from any of `starts`, a cycle cut where it closes (a
    recursive rule recurses lazily, as the input is read). Iterative: the chains measured can be deeper than
    Python's own recursion limit."""
    depth: dict[Hashable, int] = {}
    for start in starts:
        if start in depth:
            continue
        on_path = {start}
        stack = [(start, list(links(start)), 0)]  # a node, its links (asked once), how many of them are done
        while stack:
            node, children, done = stack[-1]
            if done == len(children):
                stack.pop()
                on_path.discard(node)
                depth[node] = 1 + max((depth.get(c, 0) for c in children if c not in on_path), default=0)
                continue
            stack[-1] = (node, children, done + 1)
            child = children[done]
            if child not in depth and child not in on_path:
                on_path.add(child)
                stack.append((child, list(links(child)), 0))
    return max(depth.values(), default=0)


def lark_chain(source: str) -> int:
    """The longest chain of rules (and terminals) naming one another in a Lark grammar."""
    bodies: dict[str, list[str]] = {}
    starts = [(m.start(), m.end(), m.group(1)) for m in _RULE_START.finditer(source)]
    for (_, body_start, name), following in zip(starts, [*starts[1:], (len(source), 0, "")], strict=True):
        body = _NOT_NAMES.sub(" ", source[body_start : following[0]])
        bodies.setdefault(name, []).extend(_NAME.findall(body))
    edges = {name: [n for n in dict.fromkeys(names) if n in bodies and n != name] for name, names in bodies.items()}
    return longest_chain(edges, lambda name: edges[name])


def lark_json_schemas(source: str) -> list[Any]:
    """The JSON Schemas a Lark grammar embeds with llguidance's `%json {...}`: the grammar engine compiles each by
    recursion along its `$ref`s as it does a `--json-schema`, so their chains need the same bound. One that is not
    JSON is left to the grammar engine's own error."""
    decoder = json.JSONDecoder()
    found: list[Any] = []
    for match in _JSON_DIRECTIVE.finditer(source):
        try:
            value, _ = decoder.raw_decode(source, match.end())
        except (ValueError, RecursionError):  # nested past Python's limit: far past the engine's 128, which it refuses
            continue
        found.append(value)
    return found


def schema_chain(schema: Any) -> int:
    """The longest chain of subschemas, a `$ref` followed to its target, in a JSON Schema."""
    nodes: dict[int, dict[str, Any]] = {}
    targets: dict[str, Any] = {}  # each $ref resolved once: an anchor's is a walk of the whole schema

    def key(node: dict[str, Any]) -> int:
        nodes[id(node)] = node
        return id(node)

    def links(node_id: int) -> list[int]:
        node = nodes[node_id]
        found: list[int] = []
        for keyword, value in node.items():
            if keyword in DATA_KEYWORDS:
                continue
            if keyword == "$ref" and isinstance(value, str):
                if value not in targets:
                    targets[value] = resolve(schema, value)
                if isinstance(targets[value], dict):
                    found.append(key(targets[value]))
            elif keyword in NAMED_SCHEMAS and isinstance(value, dict):
                found.extend(key(v) for v in value.values() if isinstance(v, dict))
            elif isinstance(value, dict):
                found.append(key(value))
            elif isinstance(value, list):
                found.extend(key(v) for v in value if isinstance(v, dict))
        return found

    return longest_chain([key(schema)], links) if isinstance(schema, dict) else 0


def too_deep(chain: int, what: str) -> str:
    """The error for a chain over MAX_CHAIN (`what` goes that deep), or ""."""
    if chain <= MAX_CHAIN:
        return ""
    return f"{what} {chain:,} deep, past the {MAX_CHAIN} the grammar engine can follow"
