"""Structured output: a grammar (a JSON Schema, any JSON, a regex, Lark or GBNF) as a mask over each row of logits.

The decoding state machine (`decoding.SequenceDecoder`) asks `mask` for the allowed tokens before it
samples and calls `advance` with the token it picked, so every sampler, backend and caller (generate,
chat, batch files, the server) gets the same guarantee: the text can always be completed into a match.

The grammar work is llguidance's (guidance-ai, Rust; the structured-output engine behind llama.cpp's
`%llguidance`, vLLM and SGLang). Why it rather than xgrammar or outlines-core, for this tokenizer:
- it builds its token table straight from our `tokenizer.json` (no transformers tokenizer, which
  xgrammar's `TokenizerInfo.from_huggingface` wants), in about 0.4 s for SmolLM2's 49k tokens, once;
- it compiles a grammar lazily: a matcher is ready in under 1 ms and a mask costs ~20 µs per token
  here, where outlines-core first builds a whole-vocabulary index per regex (seconds for a large
  schema) and xgrammar precompiles per schema (fine, but needs its torch helpers to apply masks);
- JSON Schema becomes a context-free grammar, so nesting and recursion are exact (outlines-core turns a
  schema into one regex), and a keyword it does not implement is an error that names it (not silently
  ignored), which is what `--json-schema` must report;
- numpy bitmask APIs and no torch dependency, so the ONNX backend path stays light.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import numpy as np

from gptcli import grammar_depth, schema_width
from gptcli.config import OutputConstraint
from gptcli.errors import ConfigError
from gptcli.grammar_messages import (
    GBNF_RULE,
    GRAMMAR_HINT,
    SCHEMA_HINT,
    TOO_WIDE_SAYS,
    describe,
    hint_for,
    too_wide,
)
from gptcli.jsonl import RepeatedKeyError, json_kind, unique_keys
from gptcli.textio import lone_surrogate
from gptcli.tokenizer import Tokenizer
from gptcli.tool_schemas import closed

# Compact JSON the way json.dumps writes it: no free whitespace, so a small model cannot wander off
# into blank lines, and ", " / ": " as separators because models have read a lot of that.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CHAIN_HINT = "inline the rules (or $defs entries) that only pass on to another one"
ANY_JSON = OutputConstraint("json")
JSON_OBJECT = OutputConstraint("json_schema", '{"type": "object"}')
MAX_GRAMMARS = 64  # compiled grammars kept per tokenizer (the server may see many schemas)
MAX_GRAMMAR_SOURCE = 2 * 1024 * 1024  # and at most this much schema/regex text behind them (~70 MB compiled)


def json_schema(text: str, where: str) -> OutputConstraint:
    """A JSON Schema given as JSON text; a ConfigError naming `where` when it is not one we can enforce."""
    try:
        schema = json.loads(text, object_pairs_hook=unique_keys)
    except RepeatedKeyError as exc:  # a keyword lost, were the last kept
        raise ConfigError(f"{where}: {exc}", hint="keep one of them") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc})", hint="a JSON Schema is a JSON object") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a usable JSON Schema", hint=SCHEMA_HINT) from None
    return schema_constraint(schema, where)


def schema_constraint(schema: Any, where: str) -> OutputConstraint:
    """A JSON Schema already parsed (a dict; `true` means any JSON) as a checked constraint."""
    if schema is True:
        return ANY_JSON
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a JSON Schema must be a JSON object, not {json_kind(schema)}")
    schema_width.check_depth(schema, where)
    schema_width.check_integer_bounds(schema, where)
    try:
        source = json.dumps(schema, allow_nan=False)  # key order kept: properties come in it
    except ValueError:
        raise ConfigError(f"{where}: NaN and Infinity are not JSON numbers", hint="write a finite number") from None
    constraint = OutputConstraint("json_schema", source, where)
    check(constraint, where)
    return constraint


def regex(pattern: str, where: str = "--regex") -> OutputConstraint:
    """The whole reply must match `pattern` (Rust regex syntax, anchored at both ends)."""
    if not pattern:
        raise ConfigError(f"{where}: the pattern is empty", hint="give a regular expression, e.g. '[0-9]+'")
    if lone_surrogate(pattern):  # bytes from the command line that are not UTF-8 (the regex engine's own error
        # quoted Python's codec: "can't encode character '\udcff' ... surrogates not allowed")
        raise ConfigError(f"{where}: the pattern is not valid UTF-8 text", hint="write it in UTF-8")
    constraint = OutputConstraint("regex", pattern, where)
    check(constraint, where)
    return constraint


def grammar_text(text: Any, where: str) -> OutputConstraint:
    """The whole reply must match a grammar: Lark (llguidance's own syntax, vLLM's with its guidance backend), or
    llama.cpp's GBNF (`root ::= ...`, told by its `::=` rules), which llguidance's converter turns into Lark."""
    if isinstance(text, str):
        text = text.removeprefix("\ufeff")  # a byte-order mark an editor wrote, as a grammar file has it dropped
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: must be a grammar (text)", hint=GRAMMAR_HINT)
    return _bounded(OutputConstraint("grammar", text, where), where)


def choice(values: Any, where: str) -> OutputConstraint:
    """The reply is exactly one of `values` (non-empty strings), as vLLM's `choice` asks."""
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{where}: must be a list of one or more non-empty strings", hint='e.g. ["yes", "no"]')
    # A JSON string is a Lark string literal (llguidance's own `choice` writes it so): each value matched exactly.
    alternatives = " | ".join(json.dumps(value, ensure_ascii=False) for value in dict.fromkeys(values))
    return _bounded(OutputConstraint("grammar", f"start: {alternatives}\n", where), where)


def _bounded(constraint: OutputConstraint, where: str) -> OutputConstraint:
    """A grammar no larger than the compiled-grammar cache holds in all, checked."""
    if len(constraint.source) > MAX_GRAMMAR_SOURCE:
        size = f"{len(constraint.source) // 1024} KiB, at most {MAX_GRAMMAR_SOURCE // 1024} KiB"
        raise ConfigError(f"{where}: the grammar is too large ({size})", hint="make it smaller")
    check(constraint, where)
    return constraint


def lark(source: str) -> str:
    """A grammar as Lark: GBNF converted by llguidance; a ValueError names the line a conversion fails at."""
    if not GBNF_RULE.search(source):
        return source
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        return gbnf_to_lark(source)
    except RecursionError:  # groups within groups some 1,000 deep: the converter recurses
        raise ValueError("invalid GBNF grammar: nested too deeply (groups within groups)") from None
    except Exception as exc:  # GbnfToLarkError names the line; a missing rule is a plain Exception
        raise ValueError(f"invalid GBNF grammar: {' '.join(str(exc).split())}") from None


def compiled_schema(constraint: OutputConstraint) -> Any:
    """A schema as its grammar reads it: objects closed (as llama.cpp, xgrammar, outlines), unenforced formats out."""
    return schema_width.enforced_formats(closed(json.loads(constraint.source)))


# llguidance segfaults on a const/enum integer within 512 of -2^63 (found by scripts/fuzz_server.py): refused.
CRASHING_INTEGER, CRASHING_BELOW = re.compile(r"(?<![\d.])-(922337203685477\d{4})(?![\d.eE])"), 9223372036854775296


class ChainTooDeep(ValueError):
    """A grammar whose references chain too deep for llguidance (grammar_depth)."""


@lru_cache(maxsize=MAX_GRAMMARS)
def grammar(constraint: OutputConstraint) -> str:
    """The llguidance grammar (a JSON string) for a constraint; a ValueError for one llguidance cannot take."""
    text = _grammar(constraint)
    if crash := next((m for m in CRASHING_INTEGER.finditer(text) if int(m.group(1)) >= CRASHING_BELOW), None):
        raise ValueError(f"the integer {crash.group(0)} is too close to -2^63 for the grammar engine: use a larger one")
    return text


def _grammar(constraint: OutputConstraint) -> str:
    import llguidance

    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.source)
    if constraint.kind == "grammar":
        text = lark(constraint.source)
        _check_chain(grammar_depth.lark_chain(text), "its rules name one another")
        for schema in grammar_depth.lark_json_schemas(text):
            _check_chain(grammar_depth.schema_chain(schema), "the subschemas and $refs of its %json go")
        return llguidance.LLMatcher.grammar_from_lark(text)
    if constraint.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema("{}", defaults=JSON_OPTIONS)
    if constraint.kind == "json_schema":
        schema = compiled_schema(constraint)
        _check_chain(grammar_depth.schema_chain(schema), "its subschemas and $refs go")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    raise ConfigError(
        f"unknown structured output kind '{constraint.kind}'", hint="use json, json_schema, regex or grammar"
    )


def _check_chain(chain: int, what: str) -> None:
    """Refuse a chain llguidance would follow by recursion past the thread's stack (a segmentation fault)."""
    if too_deep := grammar_depth.too_deep(chain, what):
        raise ChainTooDeep(too_deep)


def check(constraint: OutputConstraint, where: str) -> None:
    """Compile the grammar without a tokenizer; a one-line ConfigError naming `where` if it cannot be used."""
    import llguidance

    try:
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar(constraint))
    except ChainTooDeep as exc:
        raise ConfigError(f"{where}: {exc}", hint=CHAIN_HINT) from None
    except ValueError as exc:
        failed, messages = True, [str(exc)]
    if failed:
        message = messages[0] if messages else ""
        raise ConfigError(f"{where}: {describe(constraint, message)}", hint=hint_for(constraint, message))
    if wide := wide_object(constraint):  # it compiles, but the reply would fail at this object's `{`
        raise ConfigError(f"{where}: {wide}", hint=SCHEMA_HINT)


@lru_cache(maxsize=MAX_GRAMMARS)
def wide_object(constraint: OutputConstraint) -> str:
    """Why an object nested anywhere in a JSON Schema cannot be opened (too many optional properties), or ""."""
    if constraint.kind != "json_schema":
        return ""
    found = schema_width.first_too_wide(compiled_schema(constraint), JSON_OPTIONS)
    if found is None:
        return ""
    items, limit, pointer = found
    return TOO_WIDE_SAYS.format(items, limit, "" if pointer == "/" else f" in the object at {pointer}")


class TokenConstraint:
    """One sequence's matcher: which tokens may come next, and the grammar's state after each token."""

    def __init__(self, matcher: Any, eos_ids: frozenset[int], vocab_size: int, ll: Any = None) -> None:
        self._matcher = matcher
        self._ll = ll  # the llguidance token table: each token's bytes
        self._eos = eos_ids
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._allowed: np.ndarray | None = None

    def mask(self, logits: np.ndarray) -> np.ndarray | None:
        """A copy of `logits` with every disallowed token at -inf; None when no token is allowed."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():  # the grammar can go no further (or matches no text at all)
            self._allowed = None
            return None
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # token i is bit i (little-endian)
        width = logits.shape[-1]
        if bits.shape[0] < width:  # the model has more rows than the tokenizer has tokens: those are never text
            bits = np.pad(bits, (0, width - bits.shape[0]))
        allowed = bits[:width].view(np.bool_)
        self._allowed = allowed
        if not allowed.any():
            return None
        return np.where(allowed, logits, np.float32(-np.inf))

    def allows(self, token_id: int) -> bool:
        """Whether the last mask allowed this token."""
        allowed = self._allowed
        return allowed is not None and 0 <= token_id < allowed.shape[0] and bool(allowed[token_id])

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    def is_end(self, token_id: int) -> bool:
        """An end-of-sequence token: the grammar allowed it, so the reply is complete."""
        return token_id in self._eos

    def forced(self, token_id: int) -> bool:
        """Whether the grammar left no choice of text here: the token only spells bytes it forces next
        (`[true, true, ...]` of a fixed-length array), so a loop it makes is the schema's, not the model's."""
        ahead = self._matcher.compute_ff_bytes() if self._ll is not None else b""
        return bool(ahead) and ahead.startswith(self._ll.decode_bytes([token_id]))

    def advance(self, token_id: int) -> bool:
        """Move the grammar past this token; False (the matcher is now in error) if it did not fit."""
        return bool(self._matcher.consume_token(token_id))

    @property
    def complete(self) -> bool:
        """Nothing but end-of-sequence may follow: the reply is a whole match."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str:
        """Why the grammar can go no further, in one line ("" when it can)."""
        if not self._matcher.is_error():
            return ""
        message = self._matcher.get_error() or ""
        if wide := too_wide(message):
            return wide
        first = message.strip().splitlines()
        return first[0] if first else "the grammar failed"


class _Bridge:
    """A tokenizer's llguidance token table and its compiled grammars (the expensive parts, made once)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        import llguidance

        eos = sorted(tokenizer.eos_ids)
        self.ll = llguidance.LLTokenizer(tokenizer.to_json(), eos_token=eos or None)
        self.eos = frozenset(self.ll.eos_tokens)
        self.matchers: OrderedDict[OutputConstraint, Any] = OrderedDict()
        self.source_bytes = 0  # of the cached grammars' schemas and regexes

    def matcher(self, constraint: OutputConstraint) -> Any:
        import llguidance

        prototype = self.matchers.get(constraint)
        if prototype is None:
            prototype = llguidance.LLMatcher(self.ll, grammar(constraint), log_level=0)
            self._check_first_mask(constraint, prototype)
            self.matchers[constraint] = prototype
            self.source_bytes += len(constraint.source)
            # Compiled grammars take ~35x their source in memory: bound both their number and their size.
            while len(self.matchers) > MAX_GRAMMARS or (
                self.source_bytes > MAX_GRAMMAR_SOURCE and len(self.matchers) > 1
            ):
                evicted, _ = self.matchers.popitem(last=False)
                self.source_bytes -= len(evicted.source)
        self.matchers.move_to_end(constraint)
        return prototype.deep_copy()

    def _check_first_mask(self, constraint: OutputConstraint, prototype: Any) -> None:
        """What the first step would find, found now (some grammars fail only once the lexer meets the
        vocabulary: `a{1000000}`; some match no text at all: `[a&&b]`), so it is an error before any decoding.
        Twice, on two copies: the lexer's expressions are shared between copies, and a grammar that passes
        its first mask may already have used up their limit, failing every sequence after (`a{1000000}`)."""
        bits = np.zeros((self.ll.vocab_size + 31) // 32, dtype=np.int32)
        for _ in range(2):
            probe = prototype.deep_copy()
            if probe.is_error():
                break
            bits[:] = 0
            probe.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            if probe.is_error():
                break
        if not probe.is_error() and bits.any():  # and past the text it forces (an object's `{` opens every key)
            forced = probe.compute_ff_tokens()
            if forced and probe.consume_tokens(forced):
                after = np.zeros_like(bits)  # held by a name: a temporary's buffer is freed before the call writes it
                probe.unsafe_compute_mask_ptr(after.ctypes.data, after.nbytes)
        message = probe.get_error() if probe.is_error() else ""
        if not bits.any() or message.startswith("NoExtensionBias"):  # llguidance: no token can start a match
            message = "error: it matches no text at all"
        if message:
            raise ConfigError(describe(constraint, message), hint=hint_for(constraint, message))


_BRIDGES: weakref.WeakKeyDictionary[Tokenizer, _Bridge] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _prototype(constraint: OutputConstraint, tokenizer: Tokenizer) -> tuple[Any, _Bridge]:
    with _LOCK:
        bridge = _BRIDGES.get(tokenizer)
        if bridge is None:
            bridge = _BRIDGES[tokenizer] = _Bridge(tokenizer)
        return bridge.matcher(constraint), bridge


def prepare(constraint: OutputConstraint, tokenizer: Tokenizer, where: str = "") -> None:
    """Build the token table and compile the grammar now (the server, off the engine's thread); a grammar that
    fails only against the vocabulary (it matches no text at all) is a ConfigError naming `where` if given."""
    try:
        _prototype(constraint, tokenizer)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None


def open_constraint(constraint: OutputConstraint, tokenizer: Tokenizer) -> TokenConstraint:
    """A fresh matcher for one sequence (the token table and the compiled grammar are cached)."""
    matcher, bridge = _prototype(constraint, tokenizer)
    return TokenConstraint(matcher, bridge.eos, bridge.ll.vocab_size, bridge.ll)
