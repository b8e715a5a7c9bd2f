"""llguidance's messages on a grammar, a regex or a JSON Schema in our words: one line that names what failed and
where, and the hint for each kind of structured output."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gptcli import schema_width
from gptcli.errors import clipped

if TYPE_CHECKING:
    from gptcli.config import OutputConstraint

REGEX_HINT = "the syntax is Rust's regex crate: no look-around, no back-references"
GRAMMAR_HINT = "a grammar is Lark (llguidance's syntax, `start: ...`) or llama.cpp's GBNF (`root ::= ...`)"
GBNF_RULE = re.compile(r"^[ \t]*[A-Za-z0-9_-]+[ \t]*::=", re.MULTILINE)  # llama.cpp's rules; Lark's are `name: ...`
SCHEMA_HINT = "see the README's Structured output section for the JSON Schema subset gptcli supports"
TOO_WIDE_SAYS = "too many choices open at one point ({} items, at most {}){}: give fewer optional properties or choices"
# llguidance's message when a schema has more than its 50,000 subschemas (`max_size`), and ours
TOO_LARGE = "schema too large"
TOO_LARGE_SAYS = "the JSON Schema is too large to compile (over 50,000 subschemas): make it smaller or split it"


# llguidance's words for a regex that is valid but too big to compile (nesting, repetitions), not a syntax error
REGEX_TOO_BIG = ("exceed the maximum", "too many expressions", "size limit", "too big")
REGEX_TOO_BIG_HINT = "make the pattern smaller: fewer nested groups, smaller counted repetitions ({n})"


def hint_for(constraint: OutputConstraint, message: str = "") -> str:
    if constraint.kind == "regex" and any(words in message for words in REGEX_TOO_BIG):
        return REGEX_TOO_BIG_HINT
    return {"regex": REGEX_HINT, "grammar": GRAMMAR_HINT}.get(constraint.kind, SCHEMA_HINT)


def too_wide(message: str) -> str:
    """llguidance's "Current row has N items; max is M" in our words, or "" for any other message."""
    row = schema_width.too_wide(message)
    return TOO_WIDE_SAYS.format(*row, "") if row else ""


def describe(constraint: OutputConstraint, message: str) -> str:
    """llguidance's (sometimes multi-line) message as one line that names the offending keyword."""
    keys = re.match(r"Unimplemented keys: \[(.*)\]", message)
    if keys:
        names = ", ".join(k.strip().strip('"') for k in keys.group(1).split(","))
        return f"JSON Schema keyword not supported: {names}"
    if wide := too_wide(message):
        return wide
    if message.strip().removeprefix("error: ") == TOO_LARGE:
        return TOO_LARGE_SAYS
    if message.startswith("oneOf constraints are not supported"):  # it names an llguidance option, not ours
        return "JSON Schema keyword not supported: oneOf whose choices overlap (use anyOf, or make them exclusive)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if constraint.kind == "grammar":
        return grammar_error(constraint.source, lines)
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    detail = errors[0] if errors else (lines[0] if lines else "unknown error")
    if constraint.kind == "regex":
        return f"invalid regex '{clipped(constraint.source)}': {detail}"
    return f"invalid JSON Schema: {detail}"


def grammar_error(source: str, lines: list[str]) -> str:
    """llguidance's message on a Lark grammar as one line: where (`2(6): ...`: line 2), that line, and why."""
    if not lines:
        return "invalid grammar"
    if lines[0].startswith("invalid GBNF grammar"):
        return lines[0]
    found = re.match(r"(?:at )?(\d+)\((\d+)\): (.*)", lines[0].removeprefix("error: "))
    detail = found.group(3) if found else lines[0].removeprefix("error: ")
    cause = next((line.removeprefix("error: ") for line in lines[1:] if line.startswith("error:")), "")
    detail = f"{detail.rstrip(':')}: {cause}" if cause else detail
    if found is None or GBNF_RULE.search(source):  # a converted grammar's lines are not the ones written
        return f"invalid grammar: {detail}"
    text = lark_line(source, int(found.group(1)))
    return f"invalid grammar at line {found.group(1)} ({text}): {detail}"


def lark_line(source: str, number: int) -> str:
    lines = source.splitlines()
    text = lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return repr(text if len(text) <= 60 else text[:59] + "…")
