"""Reading user text: UTF-8 only, binary files refused, sizes bounded; each failure a one-line InputError (exit 6).

Every reader of user input reads at most its limit plus one byte, so `/dev/zero`, `/dev/urandom`, a FIFO
or a huge file fails fast with a clear error instead of filling the memory. The limits (also in the
README's table, "Exit codes and errors") live here, in one place, and so does the one YAML reader
(config files, templates, training configs), whose errors are ConfigErrors (exit 3).
"""

from __future__ import annotations

import codecs
import errno
import json
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gptcli.errors import ConfigError, InputError, clipped

MiB = 1024 * 1024
CHUNK = 64 * 1024  # the first chunk is checked for NUL bytes before more is read
BINARY_PROBE = 65536
TO_UTF8 = "convert it, e.g. iconv -t UTF-8"
UTF16_TO_UTF8 = "convert it, e.g. iconv -f UTF-16 -t UTF-8"
UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Notepad's "Unicode", Windows PowerShell's `>`
PIECE_CHARS = 1 << 20  # a long text is tokenized a piece at a time: one encoding of a whole big text costs GBs


def human_bytes(size: float, digits: int = 1) -> str:
    """A byte count in binary units, the one way gptcli writes a size: "1.5 GiB", "32 MiB", "800 B".

    `digits` decimals, dropped when they are all zero."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        text = f"{size:.{digits}f}"
        if float(text) < 1024 or unit == "GiB":  # 1023.99 KiB shows as 1 MiB, not 1024 KiB
            break
    return f"{text.rstrip('0').rstrip('.') if '.' in text else text} {unit}"


@dataclass(frozen=True)
class Limit:
    """The most bytes one kind of input may hold, what to call it in the error, and the way out."""

    max_bytes: int
    kind: str
    hint: str

    @property
    def label(self) -> str:
        return human_bytes(self.max_bytes)


PROMPT = Limit(16 * MiB, "a prompt", "split it, or use `gptcli summarize` for a long document")
DOCUMENT = Limit(64 * MiB, "a document to summarize", "split it and summarize the parts")
EVAL_TEXT = Limit(64 * MiB, "a text to evaluate", "score a part of it, e.g. head -c 10M FILE > part.txt")
CHAT_FILE = Limit(16 * MiB, "a chat file", "a chat this long is unusual: trim the file, or start a new chat")
CHAT_MESSAGE = Limit(1 * MiB, "one chat message", "shorten it, or use `gptcli summarize` for a long document")
CONFIG_FILE = Limit(1 * MiB, "a config or template file", "a settings file is small: check that it is the right file")
SCHEMA_FILE = Limit(1 * MiB, "a JSON Schema file", "a schema is small: check that it is the right file")
GRAMMAR_FILE = Limit(1 * MiB, "a grammar file", "a grammar is small: check that it is the right file")
CORPUS_FILE = Limit(128 * MiB, "one training corpus file", "split it into several files in a folder (split -C 100M)")


def over_limit(where: str, limit: Limit) -> InputError:
    return InputError(f"{where}: over the {limit.label} limit for {limit.kind}", hint=limit.hint)


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in `text` as "U+D800" (a JSON escape or non-UTF-8 bytes made it; it
    is not text and no UTF-8 file or tokenizer can hold it), or None."""
    found = LONE_SURROGATE.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


MAX_MESSAGE = 1000  # characters of an error message sent back (a server's answer, a batch line's result)
LINE_BREAKS = re.compile("\r\n|[\r\n\u2028\u2029\x0b\x0c\x1c-\x1e\x85]")


def escaped_matches(pattern: re.Pattern[str], text: str) -> str:
    """`text` with what `pattern` matches written as Python writes it in a string (`\\n`, `\\x1b`, `\\u202e`)."""
    return pattern.sub(lambda found: repr(found.group())[1:-1], text)


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """An error message as one line of at most about `limit` characters: a message quotes what it was sent
    (a model's name, a schema's type), which may hold line breaks or run to a megabyte."""
    return clipped(escaped_matches(LINE_BREAKS, message), limit)


# How a lone surrogate reaches parsed JSON: an escape (\ud800) or its UTF-8-like bytes, which json.loads lets
# through. A valid escaped pair (an emoji as ASCII JSON sends it) matches too, and the walk then finds nothing:
# it only runs for such JSON.
MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def lone_surrogate_at(raw: bytes, data: Any) -> tuple[str, str] | None:
    """(dotted path, "U+D800") of a string or key in `data`, parsed from the JSON `raw`, that holds a
    lone surrogate, else None. A key's surrogate is written in the path as its escape: the path is text."""
    if not MAYBE_SURROGATE.search(raw):
        return None
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if char := lone_surrogate(value):
                return path or "body", char
        elif isinstance(value, dict):
            for key, item in value.items():
                shown = LONE_SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", key)
                where = f"{path}.{shown}" if path else shown
                if shown != key:
                    return where, f"U+{ord(LONE_SURROGATE.search(key).group()):04X}"  # type: ignore[union-attr]
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value) if isinstance(item, (str, dict, list)))
    return None


def decode_text(data: bytes, where: str, *, final: bool = True, line: bool = False) -> str:
    """UTF-8 text, or UTF-16 that starts with its byte-order mark (the mark dropped either way); with
    final=False `data` is only a file's start, and a character its end cuts is left off. A `line` of a stream
    read line by line must be UTF-8: UTF-16's line ends are two bytes, which a split at b"\\n" cuts."""
    utf16 = data[:2] in UTF16_BOMS
    if utf16 and line:
        raise InputError(f"{where} is UTF-16 text, read line by line only as UTF-8", hint=UTF16_TO_UTF8)
    if b"\x00" in data[:BINARY_PROBE] and not utf16:
        raise InputError(f"{where} looks like a binary file (it has NUL bytes)", hint="pass a text file")
    codec = "utf-16" if utf16 else "utf-8-sig"  # a byte-order mark (Windows editors write one) is not text
    try:
        text = codecs.getincrementaldecoder(codec)().decode(data, final=final)
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where} is not valid {'UTF-16' if utf16 else 'UTF-8'} (byte {exc.start})", hint=TO_UTF8
        ) from None
    if utf16 and "\x00" in text[:BINARY_PROBE]:  # UTF-32 starts with UTF-16's mark, then NULs
        raise InputError(f"{where} looks like a binary file (it has NUL characters)", hint="pass a text file")
    return text


def read_bounded(stream: BinaryIO, where: str, limit: Limit) -> bytes:
    """At most `limit.max_bytes` from `stream`; binary input fails on its first chunk, a longer one at the limit."""
    data = read_upto(stream, where, limit.max_bytes + 1)
    if len(data) > limit.max_bytes:
        raise over_limit(where, limit)
    return data


def read_upto(stream: BinaryIO, where: str, size: int) -> bytes:
    """At most `size` bytes from `stream`; binary input fails on its first chunk (UTF-16 text has NUL bytes,
    and is decoded by decode_text)."""
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(min(CHUNK if not data else MiB, size - len(data)))
        if not chunk:
            break
        probed = len(data) < BINARY_PROBE
        data += chunk
        if probed and b"\x00" in data[:BINARY_PROBE] and data[:2] not in UTF16_BOMS:
            raise InputError(f"{where} looks like a binary file (it has NUL bytes)", hint="pass a text file")
    return bytes(data)


def read_text_file(path: Path, limit: Limit = PROMPT) -> str:
    """Read a UTF-8 text file of at most `limit`, or fail with a one-line InputError."""
    return read_text_head(path, limit, limit.max_bytes)[0]


def read_text_head(path: Path, limit: Limit, size: int) -> tuple[str, bool]:
    """The start of a UTF-8 text file, at most `size` bytes of it (ending on a whole character), and whether
    that is the whole file; a file read past `limit` is refused, as read_text_file refuses it."""
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a file", hint="pass a text file")
    size = min(size, limit.max_bytes)
    try:
        with path.open("rb") as handle:
            data = read_upto(handle, str(path), size + 1)  # the byte past `size` says whether more follows
    except FileNotFoundError:
        raise InputError(f"file not found: {path}", hint="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    whole = len(data) <= size
    if not whole and size == limit.max_bytes:
        raise over_limit(str(path), limit)
    return decode_text(data if whole else data[:size], str(path), final=whole), whole


def read_json_file(path: Path, max_bytes: int) -> Any:
    """A JSON file of a model folder (config.json, tokenizer.json, an index) of at most `max_bytes`.

    Not user text, so the caller turns the ValueError (too big, too deeply nested, not JSON, not a regular
    file: a FIFO would block) into its own error; OSError passes through."""
    if not path.is_file() and path.exists():
        raise ValueError("not a regular file")
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"over {human_bytes(max_bytes)}, far more than such a file holds")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_text_stream(stream: BinaryIO, where: str, limit: Limit) -> str:
    """Read a UTF-8 text stream (stdin) of at most `limit`."""
    return decode_text(read_bounded(stream, where, limit), where)


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, each cut after a newline where there is one, else
    before a space (a word keeps the space in front of it, as BPE pre-tokenizers group them)."""
    start = 0
    while start < len(text):
        end = start + size
        if end < len(text):
            newline = text.rfind("\n", start, end)
            space = text.rfind(" ", start + 1, end)
            end = newline + 1 if newline > start else space if space > start else end
        yield text[start:end]
        start = end


_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?。！？;:])\s+")
_JOINT = "\n\n"  # between the paragraphs and sentences of a chunk


def split_text(text: str, budget: int, count: Callable[[str], int], cut: Callable[[str, int], list[str]]) -> list[str]:
    """Chunks of at most `budget` tokens each (as `count` counts them), broken at paragraphs, else sentences,
    else where `cut` cuts (summarize's map step).

    Each piece is counted once and chunks are packed by adding up the counts (re-counting every growing
    chunk made a 1 MB text take a minute); each chunk is then counted whole, since tokens can merge across a
    joint, and one over the budget gives up its last pieces to a chunk of their own.
    """
    units: list[tuple[str, int]] = []
    for para in (p.strip() for p in _PARAGRAPH.split(text)):
        if not para:
            continue
        size = count(para)
        if size <= budget:
            units.append((para, size))
            continue
        for sentence in (s.strip() for s in _SENTENCE.split(para)):
            if not sentence:
                continue
            size = count(sentence)
            pieces = [sentence] if size <= budget else cut(sentence, budget)
            units.extend((piece, size if len(pieces) == 1 else count(piece)) for piece in pieces)
    joint = max(0, count(f"a{_JOINT}a") - 2 * count("a"))  # in context (alone, "\n\n" can be one token fewer)
    groups: deque[list[str]] = deque()
    group: list[str] = []
    used = 0
    for unit, size in units:
        if group and used + joint + size > budget:
            groups.append(group)
            group, used = [], 0
        used += size + (joint if group else 0)
        group.append(unit)
    if group:
        groups.append(group)
    chunks: list[str] = []
    while groups:
        group = groups.popleft()
        spill: list[str] = []
        while len(group) > 1 and count(_JOINT.join(group)) > budget:
            spill.insert(0, group.pop())
        chunks.append(_JOINT.join(group))
        if spill:
            groups.appendleft(spill)
    return chunks


MAX_YAML_VALUES = 1_000_000  # after aliases are expanded: "billion laughs" stops here, not in the memory


def read_yaml(path: Path, kind: str = "config file") -> dict[str, Any]:
    """The one YAML reader: safe_load, a mapping at the top, errors that name the file (as `kind`).

    The file may hold at most 1 MiB (InputError, exit 6), and its aliases may not expand it past
    MAX_YAML_VALUES values (safe_load shares aliased nodes, but every reader walks them out in full).
    """
    import yaml

    try:
        with path.open("rb") as handle:
            raw = handle.read(CONFIG_FILE.max_bytes + 1)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{kind} not found: {path}", hint="check the path") from None
    except OSError as exc:
        hint = "give a YAML file, not a folder" if exc.errno == errno.EISDIR else "check the path and its permissions"
        raise ConfigError(f"cannot read {kind} {path}: {exc.strerror or exc}", hint=hint) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read {kind} {path}: not UTF-8 text (byte {exc.start})", hint=TO_UTF8) from None
    if len(raw) > CONFIG_FILE.max_bytes:
        raise over_limit(str(path), CONFIG_FILE)
    try:
        data = _load_checked(yaml.SafeLoader, text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses (a NUL, a control): no mark
            line, column = text.count("\n", 0, exc.position), exc.position - text.rfind("\n", 0, exc.position) - 1
            where, problem = f"{path}:{line + 1}:{column + 1}", f"{exc.reason} (U+{exc.character:04X})"
        raise ConfigError(f"{where}: invalid YAML: {problem}", hint="fix the YAML syntax") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def _load_checked(loader_class: Any, text: str, path: Path) -> Any:
    """safe_load, with the size of the node graph checked before any Python object is built."""
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_size(root: Any, path: Path) -> None:
    """Count the values of the YAML node graph as if its aliases were written out (iteratively, memoised)."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{path}: its YAML aliases expand to over {MAX_YAML_VALUES:,} values",
                    hint="write the values out instead of repeating &anchors with *aliases",
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"{path}: a YAML alias refers to a value that contains it", hint="remove the alias")
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, path)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _check_unique_keys(node: Any, path: Path) -> None:
    """A key given twice in one mapping is a ConfigError (PyYAML quietly keeps the last: a setting lost)."""
    seen: set[str] = set()
    for key_node, _ in node.value:
        name = getattr(key_node, "value", None)
        if not isinstance(name, str) or name == "<<":  # merge keys may repeat
            continue
        if name in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"{path}:{line}: '{name}' is given twice in the same mapping", hint="keep one of them")
        seen.add(name)
