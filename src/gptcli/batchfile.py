"""Batch files: one JSON request per line in, one JSON result per line out, run concurrently by the engine.

A request line is an object with `prompt` (text) or `messages` (chat messages), and optionally an
`id`, a `system` message, `raw` (no chat template) and per-line sampling settings (`temperature`,
`top_p`, `top_k`, `min_p`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `max_tokens`,
`seed`, `stop`). A line that cannot
be run (bad JSON, unknown keys, a prompt over the context) becomes an error result for that line;
the run goes on. Results are written in input order as soon as every earlier line is done, each line
flushed and synced, so an interrupted run keeps everything finished and `--resume` skips the ids
already in the output.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gptcli.config import SAMPLING_KNOBS, Settings, with_sampling
from gptcli.decoding import Finished
from gptcli.engine import Engine, run_all
from gptcli.errors import ConfigError, GptcliError, InputError
from gptcli.prompts import MESSAGE_ROLES, build_prompt, fit_prompt, transcript
from gptcli.tokenizer import Tokenizer

MAX_LINE_BYTES = 4 * 1024 * 1024  # one request line; a longer one is an error result, never read whole
SAMPLING_KEYS = (*SAMPLING_KNOBS, "max_tokens", "seed", "stop")
REQUEST_KEYS = {"id", "prompt", "messages", "system", "raw", *SAMPLING_KEYS}
FINISH_NAMES = {"context": "length"}  # OpenAI's names: a full context is a length stop


@dataclass(frozen=True)
class BatchRequest:
    """One parsed line: what to run, or why it cannot run."""

    index: int
    id: str
    prompt_ids: list[int] = field(default_factory=list)
    settings: Settings | None = None
    error: str | None = None
    numbered: bool = False  # the line has no `id`: its id is its line number


@dataclass
class BatchSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    completion_tokens: int = 0
    interrupted: bool = False


def read_lines(handle: IO[bytes]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each non-blank line; None for a line over MAX_LINE_BYTES (skipped unread)."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # drain the rest of the long line in bounded pieces
                line = handle.readline(MAX_LINE_BYTES)
            yield number, None
        elif line.strip():
            yield number, line


def _encode_messages(tokenizer: Tokenizer, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise InputError("`messages` must be a non-empty list")
    for message in messages:
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise InputError("each message needs a string `role` and `content`")
        if message["role"] not in MESSAGE_ROLES:
            raise InputError(f"unknown message role {message['role']!r} (known: {', '.join(MESSAGE_ROLES)})")
    # As `gptcli chat` builds a conversation: the chat template, or a plain transcript for a base model.
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    return build_prompt(tokenizer, turns, plain=transcript).ids


def parse_request(
    number: int, raw: bytes | None, tokenizer: Tokenizer, settings: Settings, context_length: int
) -> BatchRequest:
    """Turn one line into a request; every problem becomes the line's error, never an exception."""
    line_id, numbered = str(number), True
    try:
        if raw is None:
            raise InputError(f"the line is over {MAX_LINE_BYTES // (1024 * 1024)} MiB")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise InputError("a line must be a JSON object")
        if "id" in data:
            if not isinstance(data["id"], (str, int)) or isinstance(data["id"], bool):
                raise InputError("`id` must be a string or a number")
            line_id, numbered = str(data["id"]), False
        unknown = sorted(set(data) - REQUEST_KEYS)
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(REQUEST_KEYS))})")
        changes = {k: data[k] for k in SAMPLING_KEYS if k in data}
        line_settings = with_sampling(settings, **changes) if changes else settings
        system = data.get("system", line_settings.system)
        if ("prompt" in data) == ("messages" in data):
            raise InputError("give exactly one of `prompt` or `messages`")
        _check_prompt_options(data)
        if "messages" in data:
            ids = _encode_messages(tokenizer, data["messages"])
            if len(ids) >= context_length:
                raise InputError(f"the prompt is {len(ids)} tokens but the model's context holds {context_length}")
        else:
            if not isinstance(data["prompt"], str) or not data["prompt"].strip():
                raise InputError("`prompt` must be non-empty text")
            ids = fit_prompt(
                tokenizer,
                data["prompt"],
                context_length=context_length,
                max_tokens=line_settings.sampling.max_tokens,
                on_overflow=line_settings.on_overflow,
                system=system,
                raw=data.get("raw", False),
            ).ids
        return BatchRequest(number, line_id, ids, line_settings, numbered=numbered)
    except (InputError, ConfigError) as exc:
        return BatchRequest(number, line_id, error=exc.message, numbered=numbered)


def _check_prompt_options(data: dict) -> None:
    """`system` and `raw` shape a `prompt` through the chat template: refuse what would be silently dropped."""
    if "system" in data and not isinstance(data["system"], str):
        raise InputError("`system` must be text")
    if "raw" in data and not isinstance(data["raw"], bool):
        raise InputError("`raw` must be true or false")
    if "messages" in data and ("system" in data or "raw" in data):
        raise InputError('`system` and `raw` go with `prompt`; in `messages`, give a {"role": "system"} message')
    if data.get("raw") and "system" in data:
        raise InputError("`raw: true` sends the prompt without the chat template, so `system` would be dropped")


def count_lines(path: Path) -> int | None:
    """Non-blank lines in a file, read in bounded blocks (for a progress total); None for stdin."""
    if str(path) == "-":
        return None
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


def completed_ids(output: Path) -> set[str]:
    """The ids already in an output file (for --resume); a torn last line is ignored."""
    done: set[str] = set()
    if not output.exists():
        return done
    with output.open("rb") as handle:
        for _, raw in read_lines(handle):
            result_id = _result_id(raw)
            if result_id is not None:
                done.add(result_id)
    return done


def _result_id(raw: bytes | None) -> str | None:
    """The id of a results-file line, or None for a line that is not a whole result."""
    try:
        record = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return str(record["id"]) if isinstance(record, dict) and "id" in record else None


def open_results(output: Path, *, resume: bool) -> IO[str]:
    """The results file, opened for appending (its folder made); on --resume, a torn last line is
    settled first so the next result starts on a line of its own: kept with its newline when it is a
    whole record (it counts as done), cut off when it is not (its request runs again)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if resume and output.exists():
            _settle_last_line(output)
        return output.open("a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {output}: {exc.strerror}", hint="check the path and its permissions") from None


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
        if end - start <= MAX_LINE_BYTES and _result_id(handle.read()) is not None:
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

    def add(self, index: int, record: dict[str, Any]) -> None:
        self._waiting[index] = record
        while self._order and self._order[0] in self._waiting:
            self._write(self._waiting.pop(self._order.pop(0)))

    def flush_all(self) -> None:
        """On interrupt: write every finished result, even past a gap (their ids make --resume exact)."""
        for index in list(self._order):
            if index in self._waiting:
                self._write(self._waiting.pop(index))
                self._order.remove(index)

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        if self.sync:
            with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal: nothing to sync
                os.fsync(self.stream.fileno())


def result_record(request: BatchRequest, finished: Finished) -> dict[str, Any]:
    stats = finished.stats
    return {
        "id": request.id,
        "text": finished.text,
        "finish_reason": FINISH_NAMES.get(finished.reason, finished.reason),
        "usage": {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
        },
    }


def error_record(request_id: str, message: str) -> dict[str, Any]:
    return {"id": request_id, "error": {"message": message, "type": "invalid_request_error"}}


def run_batch(
    engine: Engine,
    requests: Iterable[BatchRequest],
    writer: ResultWriter,
    *,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    on_token: Callable[[int], None] | None = None,
    on_result: Callable[[BatchSummary], None] | None = None,
) -> BatchSummary:
    """Run every request through the engine; write each result (or the line's error) in order."""
    summary = BatchSummary()
    seen: dict[str, bool] = {}  # id -> whether it was a line number
    by_index: dict[int, BatchRequest] = {}  # run_all's position (the n-th request yielded) -> the request
    positions = itertools.count()

    def runnable() -> Iterator[tuple[list[int], Any]]:
        for request in requests:
            if request.id in skip:
                summary.skipped += 1
                continue
            writer.expect(request.index)
            if request.id in seen:
                why = f"duplicate id {request.id!r}"
                if request.numbered or seen[request.id]:
                    why += " (a line without an id gets its line number: give every line an id, or none)"
                request = BatchRequest(request.index, request.id, error=why)
            seen.setdefault(request.id, request.numbered)
            if request.error is None and request.settings is not None:
                try:
                    engine.check_fits(len(request.prompt_ids), request.settings.sampling)
                except InputError as exc:
                    request = BatchRequest(request.index, request.id, error=exc.message)
            if request.error is not None or request.settings is None:
                summary.failed += 1
                writer.add(request.index, error_record(request.id, request.error or "bad request"))
                if on_result is not None:
                    on_result(summary)
                continue
            by_index[next(positions)] = request  # not len(by_index): finished requests leave it
            yield request.prompt_ids, request.settings.sampling

    try:
        for position, event in run_all(engine, runnable()):
            if isinstance(event, Finished):
                request = by_index.pop(position)
                if event.reason == "interrupted":  # unfinished: not written, so --resume runs it again
                    summary.interrupted = True
                    continue
                record = result_record(request, event)
                summary.ok += "error" not in record
                summary.failed += "error" in record
                summary.completion_tokens += event.stats.new_tokens
                writer.add(request.index, record)
                if on_result is not None:
                    on_result(summary)
            elif on_token is not None and event.id is not None:
                on_token(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    except GptcliError:
        writer.flush_all()
        raise
    if summary.interrupted:
        writer.flush_all()
    return summary
