"""JSON Lines files, read and written in bounded pieces: a batch's requests in, its results out.

Lines are read at most MAX_LINE_BYTES at a time (a longer one is reported, never held whole), and read
ahead on a thread of their own (`ReadAhead`): a pipe whose producer is slow never stalls the run. Results
are written in input order as soon as every earlier one is done, each line flushed and synced, and read
back for --resume: a torn last line is settled first.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import json
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from gptcli.errors import InputError
from gptcli.textio import UTF16_BOMS, UTF16_TO_UTF8

MAX_LINE_BYTES = 4 * 1024 * 1024  # one request line; a longer one is an error result, never read whole
READ_AHEAD = 8  # items a ReadAhead holds: a huge file is still read lazily

T = TypeVar("T")


def read_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each non-blank line; None for a line over MAX_LINE_BYTES (skipped unread).

    A NUL byte means binary data (a device such as /dev/zero, an archive), not JSON Lines: an InputError,
    before any more of it is read. A byte-order mark before the first line (Windows editors write one) is
    not part of it."""
    number = 0
    while True:
        line = _text(handle.readline(MAX_LINE_BYTES + 1), number + 1)
        if not line:
            return
        number += 1
        if number == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            yield number, None  # its error now: the rest may be long in coming, or never end (a pipe's writer)
            while line and not line.endswith(b"\n"):  # drain the rest of the long line in bounded pieces
                line = _text(handle.readline(MAX_LINE_BYTES), number)
        elif line.strip():
            yield number, line


class ReadAhead(Generic[T]):
    """The items of `source`, read on a thread of their own at most `depth` ahead, so that whoever takes them
    can ask whether the next one is `ready` instead of waiting for a slow source (a pipe, `tail -f`).

    `next()` waits for the next item; the end (StopIteration) and the source's error are raised in order,
    and again on every later call. `notify(callback)`: the reader thread calls it after each item (and
    after the end or the error) is ready. `close()` lets the reader go (a thread that waits in a read ends
    with the process: give it a file object of its own, not one the interpreter closes at exit, such as
    sys.stdin's). With `depth` 0 nothing is read ahead: next() reads in the caller's thread and `ready` is
    always true (a regular file, a list: the run takes its items in the same order at the same steps)."""

    def __init__(self, source: Iterable[T], depth: int = READ_AHEAD) -> None:
        self._source = iter(source)
        # A SimpleQueue: its wait, in C, leaves no lock half-released when Ctrl-C lands in it (twice, say);
        # the bound is the reader's to wait for, on its own thread.
        self._items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()  # (is the end, item or error)
        self._room = threading.Semaphore(depth)
        self._ended: BaseException | None = None  # StopIteration, or the source's error, once taken
        self._closed = False
        self._listeners: list[Callable[[], None]] = []
        self._inline = depth == 0
        if not self._inline:
            threading.Thread(target=self._read, args=(self._source,), name="gptcli-read-ahead", daemon=True).start()

    def _read(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(False, item):
                    return
        except BaseException as exc:  # raised again on the taking thread, in its place
            self._put(True, exc)
        else:
            self._put(True, StopIteration())

    def _put(self, ended: bool, value: Any) -> bool:
        self._room.acquire()  # waits while `depth` items are ready: memory stays bounded
        if self._closed:
            return False
        self._items.put((ended, value))
        for listener in list(self._listeners):
            listener()
        return True

    def notify(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def ready(self) -> bool:
        """Whether next() returns (an item, the end or the error) without waiting."""
        return self._inline or self._ended is not None or not self._items.empty()

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._ended is None:
            if self._inline:
                try:
                    return next(self._source)
                except Exception as exc:  # the end, or the source's error: kept, as the reader keeps it
                    self._ended = exc
                    raise
            ended, value = self._items.get()  # Ctrl-C interrupts the wait
            self._room.release()
            if not ended:
                return value
            self._ended = value
        raise self._ended

    def close(self) -> None:
        self._closed = True
        self._room.release()  # a reader waiting for room wakes, sees it is closed and ends


def _text(piece: bytes, number: int) -> bytes:
    if b"\0" in piece:
        if number == 1 and piece[:2] in UTF16_BOMS:
            raise InputError("line 1 is UTF-16 text: JSON Lines is UTF-8", hint=UTF16_TO_UTF8)
        raise InputError(f"line {number} holds a NUL byte: this is binary data, not JSON Lines", hint="check the file")
    return piece


def may_wait(path: Path) -> bool:
    """Whether reading `path` may wait for a writer (stdin, a pipe such as <(…), a FIFO, a device: read only
    once, as it comes), not a regular file."""
    return str(path) == "-" or not path.is_file()


def count_lines(path: Path) -> int | None:
    """Non-blank lines (those read_lines yields) in a regular file, read in bounded blocks (for a progress
    total); None for anything else (`may_wait`), which can be read only once, and for binary data (a NUL
    byte: read_lines refuses that line, so a 20 GiB image fails at once, not after it was all read here)."""
    if may_wait(path):
        return None
    lines, pending = 0, False  # pending: the line read so far holds more than blanks
    with path.open("rb") as handle:
        block = handle.read(1 << 20).removeprefix(codecs.BOM_UTF8)
        while block:
            if b"\0" in block:
                return None
            *ended, rest = block.split(b"\n")
            for piece in ended:
                lines += pending or bool(piece.strip())
                pending = False
            pending = pending or bool(rest.strip())
            block = handle.read(1 << 20)
    return lines + pending


def check_results_file(output: Path) -> None:
    """Before --resume appends to `output` (and cuts a torn last line off it): it must hold results."""
    if output.exists() and not output.is_file() and not output.is_dir():  # a folder has its own error
        raise InputError(f"--resume reads {output} back, so it must be a regular file, not a pipe or a device")
    if not output.is_file() or output.stat().st_size == 0:
        return
    if not holds_results(output):
        raise InputError(
            f"{output} does not hold results (its first line is not a result)",
            hint="give --output the results file of this batch, or a new file",
        )


def holds_results(output: Path) -> bool:
    """Whether a non-empty file's first line is a result (or one a kill cut short): a requests file is not."""
    with output.open("rb") as handle:
        first = handle.readline(MAX_LINE_BYTES + 1).removeprefix(codecs.BOM_UTF8)  # as read_lines reads it
    torn = first.startswith(b"{") and not first.endswith(b"\n")  # a kill during the first result's write
    return torn or _result_id(first) is not None


def completed_ids(output: Path) -> set[str]:
    """The ids already in an output file (for --resume); a torn last line is ignored."""
    done: set[str] = set()
    if not output.exists():
        return done
    with output.open("rb") as handle:
        try:
            for _, raw in read_lines(handle):
                result_id = _result_id(raw)
                if result_id is not None:
                    done.add(result_id)
        except InputError as exc:  # NUL bytes: in the last line, what a crash leaves (cut off when resuming)
            if handle.read(1):
                raise InputError(f"{output}: {exc.message}", hint="give --output this batch's results file") from None
    return done


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (an error names what it was sent: "null", not "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


class RepeatedKeyError(ValueError):
    """A JSON object that gives one key twice: json.loads would quietly keep the last (a value lost)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key '{key}' is given twice in one object")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook that refuses a key given twice (a RepeatedKeyError naming it)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        seen: set[str] = set()
        raise RepeatedKeyError(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return value


MAX_INT_DIGITS = 4300  # Python's default limit for int(str)


class TooManyDigits(ValueError):
    """A JSON integer longer than Python reads (valid JSON all the same, so not "not valid JSON")."""


def whole_number(text: str) -> int:
    """json.loads' parse_int: one of thousands of digits is a TooManyDigits that says so (int()'s own error
    names a Python call)."""
    if (digits := len(text.lstrip("-"))) > MAX_INT_DIGITS:
        raise TooManyDigits(f"a number of {digits:,} digits, over {MAX_INT_DIGITS:,}")
    return int(text)


def parse_line(raw: bytes) -> Any:
    """One JSON Lines line as a value; any line that is not one (not UTF-8, not JSON, a key given twice,
    nested too deeply for the parser, an integer of thousands of digits) is a ValueError saying why, never
    another exception."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys, parse_int=whole_number)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except RepeatedKeyError:
        raise
    except ValueError as exc:  # JSONDecodeError, and int()'s digit limit
        raise ValueError(f"not valid JSON ({exc})") from None


def _result_id(raw: bytes | None) -> str | None:
    """The id of a results-file line, or None for a line that is not a whole result: a result has its
    `text` or its `error` beside the id (a request line has an id too, and neither)."""
    try:
        record = parse_line(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(record, dict) or "id" not in record or not ("text" in record or "error" in record):
        return None
    return str(record["id"])


def results_lock_path(output: Path) -> Path:
    """The lock a run holds on its results file while it writes it (gptcli.locks.owner_lock)."""
    return output.parent / f".{output.name}.gptcli-lock"


def open_results(output: Path, *, resume: bool) -> IO[str]:
    """The results file, opened for appending (its folder made); on --resume, a torn last line is
    settled first so the next result starts on a line of its own: kept with its newline when it is a
    whole record (it counts as done), cut off when it is not (its request runs again). A path that cannot be
    written (a read-only disk, a folder not ours) is an OSError naming it, which paths.environment_error says as it
    says every output path that cannot be written (exit 1)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if resume and output.exists():
            _settle_last_line(output)
        return output.open("a", encoding="utf-8")
    except (FileExistsError, NotADirectoryError):
        # a file where one of the path's folders should be (mkdir says "File exists"): left to the caller's
        # paths.environment_error, which names that file
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(output)) from None
    except OSError as exc:
        if exc.filename is None:  # opening for appending seeks to the end: a /proc file refuses, naming nothing
            raise OSError(exc.errno, exc.strerror, str(output)) from None
        raise


def _settle_last_line(output: Path) -> None:
    with output.open("r+b") as handle:
        end = handle.seek(0, io.SEEK_END)
        start = end
        while start > 0:  # back to the byte after the last newline, a block at a time
            step = min(1 << 16, start)
            handle.seek(start - step)
            block = handle.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                start = start - step + newline + 1
                break
            start -= step
        if start == end:
            return  # empty, or it ends with a newline
        handle.seek(start)
        last = handle.read(MAX_LINE_BYTES + 1)  # at the end now, when it is short enough to keep
        if start == 0:  # the file's only line: read as read_lines reads it
            last = last.removeprefix(codecs.BOM_UTF8)
        if end - start <= MAX_LINE_BYTES and _result_id(last) is not None:
            handle.write(b"\n")
        else:
            handle.truncate(start)


class ResultWriter:
    """Writes results in input order as soon as every earlier one is done; each line flushed and synced."""

    def __init__(self, stream: IO[str], *, sync: bool = True) -> None:
        self.stream = stream
        self.sync = sync
        self._waiting: dict[int, dict[str, Any]] = {}
        self._order: list[int] = []

    def expect(self, index: int) -> None:
        self._order.append(index)

    @property
    def held(self) -> int:
        """Finished results waiting for an earlier one before they can be written."""
        return len(self._waiting)

    def add(self, index: int, record: dict[str, Any]) -> None:
        self._waiting[index] = record
        while self._order and self._order[0] in self._waiting:
            self._write(self._waiting.pop(self._order.pop(0)))

    def flush_all(self, unfinished_ids: Collection[str] = ()) -> None:
        """On interrupt: write every finished result, even past a gap (their ids make --resume exact), but
        none whose id is also an unfinished line's (a duplicate's error): --resume would count that line done."""
        for index in list(self._order):
            if index in self._waiting:
                record = self._waiting.pop(index)
                if str(record.get("id")) not in unfinished_ids:
                    self._write(record)
                self._order.remove(index)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.stream.flush()
        except OSError as exc:  # a full disk: say which file (a write to an open file does not)
            name = getattr(self.stream, "name", None)
            if exc.filename or exc.errno is None or not isinstance(name, str) or name.startswith("<"):
                raise
            raise type(exc)(exc.errno, exc.strerror, name) from None
        if self.sync:
            with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal: nothing to sync
                os.fsync(self.stream.fileno())
