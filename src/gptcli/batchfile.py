"""Batch files: one JSON request per line in, one JSON result per line out, run concurrently.

The lines run through the local engine (`LocalLines`) or, in client mode, as concurrent requests to an
OpenAI-compatible server (`RemoteLines`: the server applies its chat template and batches them).

A line is parsed into a request by gptcli.batch_requests; one that cannot be run (bad JSON, unknown keys, a
prompt over the context) becomes an error result for that line, and the run goes on. Results are written in
input order as soon as every earlier line is done (no line starts while MAX_HELD_RESULTS wait behind one still
running), each line flushed and synced, so an interrupted run keeps everything finished and `--resume` skips the
ids already in the output. The lines of a pipe are read ahead on a thread of their own, so a slow producer never
stalls the lines running.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from gptcli.batch_requests import BatchRequest, error_record, result_record
from gptcli.decoding import Event, Finished, Token
from gptcli.engine import Engine, run_all
from gptcli.errors import FieldError, GptcliError, InputError
from gptcli.fanout import run_streams
from gptcli.jsonl import READ_AHEAD, ReadAhead, ResultWriter

# Results held back for input order behind a line still running (a long first line, thousands of short ones
# after it, each finished and kept until the first is written): past this many, no line starts until the
# oldest unfinished one is done, so memory stays bounded however long the file.
MAX_HELD_RESULTS = 1024


@dataclass
class BatchSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    completion_tokens: int = 0
    interrupted: bool = False


class Intake:
    """The requests a batch runs, taken from a ReadAhead and settled as they are taken (`settle`: the request
    to run, or None for a line it skipped or wrote as an error). `ready()` says whether next() returns the
    next request to run (or the end, or the source's error) without waiting for the source; settling the
    lines that do not run on the way. `notify` is the ReadAhead's: called when another line is ready."""

    def __init__(self, ahead: ReadAhead[BatchRequest], settle: Callable[[BatchRequest], BatchRequest | None]) -> None:
        self._ahead = ahead
        self._settle = settle
        self._next: BatchRequest | None = None
        self.notify = ahead.notify

    def ready(self) -> bool:
        while self._next is None and self._ahead.ready():
            try:
                request = next(self._ahead)
            except Exception:  # the end, or the source's error: next() raises it again
                return True
            self._next = self._settle(request)
        return self._next is not None

    def __iter__(self) -> Intake:
        return self

    def __next__(self) -> BatchRequest:
        while self._next is None:
            self._next = self._settle(next(self._ahead))
        request, self._next = self._next, None
        return request


class Lines(Protocol):
    """Where the lines run: `check` refuses one that can never run (its error is the line's result), `run`
    yields (position in `requests`, event), or a GptcliError in place of a line's Finished, starting another
    request while some run only when `may_start()` says yes (and, when it said no for want of a ready line,
    looking again when `requests` notifies that one is)."""

    # Whether every streamed piece is a token: a server streams about one a piece, with no ids; the local
    # engine gives ids, and a piece without one is held-back text of tokens already counted.
    pieces_are_tokens: bool

    def check(self, request: BatchRequest) -> None: ...
    def run(self, requests: Intake, may_start: Callable[[], bool]) -> Iterator[tuple[int, Event | GptcliError]]: ...


class LocalLines:
    """The lines through this process's engine."""

    pieces_are_tokens = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def check(self, request: BatchRequest) -> None:
        assert request.settings is not None
        try:
            self.engine.check_fits(len(request.prompt_ids), request.settings.sampling)
        except FieldError as exc:  # as the server's 400: a min_tokens the context cannot hold after the prompt
            raise InputError(exc.message) from None

    def run(self, requests: Intake, may_start: Callable[[], bool]) -> Iterator[tuple[int, Event | GptcliError]]:
        jobs = ((r.prompt_ids, r.settings.sampling) for r in requests)  # type: ignore[union-attr]
        return run_all(self.engine, jobs, may_start=may_start)


class RemoteLines:
    """The lines as requests to an OpenAI-compatible server (`gptcli.remote.RemoteModel`), `parallel` at a time."""

    pieces_are_tokens = True

    def __init__(self, remote: Any, parallel: int) -> None:
        self.remote = remote
        self.parallel = parallel

    def check(self, request: BatchRequest) -> None:
        pass  # the server says what it refuses

    def run(self, requests: Intake, may_start: Callable[[], bool]) -> Iterator[tuple[int, Event | GptcliError]]:
        starts = (self._start(r) for r in requests)
        return run_streams(starts, self.parallel, may_start=may_start, wake=requests.notify)

    def _start(self, request: BatchRequest) -> Callable[[], Iterator[Event]]:
        params = request.settings.sampling  # type: ignore[union-attr]
        if request.text is not None:
            return functools.partial(self.remote.complete, request.text, params)
        extra = {"extra": request.prefill} if request.prefill else {}  # the line's prefill fields, as it gives them
        if request.tools is not None:  # the server's calls come back in a CallsFinished
            return functools.partial(self.remote.chat, request.messages, params, request.tools, **extra)
        return functools.partial(self.remote.chat, request.messages, params, **extra)


def _is_new_token(event: Event | GptcliError, lines: Lines) -> bool:
    return isinstance(event, Token) and (event.id is not None or lines.pieces_are_tokens)


def run_batch(
    lines: Lines,
    requests: Iterable[BatchRequest],
    writer: ResultWriter,
    *,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
    on_token: Callable[[int], None] | None = None,
    on_result: Callable[[BatchSummary], None] | None = None,
    read_ahead: bool = False,
) -> BatchSummary:
    """Run every request; write each result (or the line's error) in order.

    With `read_ahead` (a pipe, whose next line may come seconds later) the requests are read on a thread of
    their own: while lines run, a new one starts only when it is ready, so a slow producer never stalls the
    running lines nor the writing of finished results; with nothing running, the run waits for it.

    A line the server refuses (a 400: a bad setting, a prompt over its context) is that line's error; any
    other failure (the server gone, a wrong key) ends the run with every finished result written."""
    summary = BatchSummary()
    seen: dict[str, bool] = {}  # id -> whether it was a line number
    by_index: dict[int, BatchRequest] = {}  # the run's position (the n-th request taken) -> the request
    unfinished: set[str] = set()  # ids of lines an interrupt ended: a duplicate's error must not mark them done
    positions = itertools.count()

    def failed(request: BatchRequest, message: str) -> None:
        summary.failed += 1
        writer.add(request.index, error_record(request.id, message))
        if on_result is not None:
            on_result(summary)

    def settle(request: BatchRequest) -> BatchRequest | None:
        """The request to run, or None for a line settled here: skipped, or its error written."""
        if request.id in skip:
            summary.skipped += 1
            return None
        writer.expect(request.index)
        if request.id in seen:
            why = f"duplicate id {request.id!r}"
            if request.numbered or seen[request.id]:
                why += " (a line without an id gets its line number: give every line an id, or none)"
            request = BatchRequest(request.index, request.id, error=why)
        seen.setdefault(request.id, request.numbered)
        if request.error is None and request.settings is not None:
            try:
                lines.check(request)
            except InputError as exc:
                request = BatchRequest(request.index, request.id, error=exc.message)
        if request.error is not None or request.settings is None:
            failed(request, request.error or "bad request")
            return None
        by_index[next(positions)] = request  # not len(by_index): finished requests leave it
        return request

    ahead = ReadAhead(requests, READ_AHEAD if read_ahead else 0)
    intake = Intake(ahead, settle)
    try:
        for position, event in lines.run(intake, lambda: writer.held < MAX_HELD_RESULTS and intake.ready()):
            if isinstance(event, GptcliError):
                if not isinstance(event, InputError):
                    raise event
                failed(by_index.pop(position), event.message)
            elif isinstance(event, Finished):
                request = by_index.pop(position)
                if event.reason == "interrupted":  # unfinished: not written, so --resume runs it again
                    summary.interrupted = True
                    unfinished.add(request.id)
                    continue
                record = result_record(request, event)
                summary.ok += "error" not in record
                summary.failed += "error" in record
                summary.completion_tokens += event.stats.new_tokens
                writer.add(request.index, record)
                if on_result is not None:
                    on_result(summary)
            elif on_token is not None and _is_new_token(event, lines):
                on_token(1)
    except KeyboardInterrupt:
        summary.interrupted = True
    except BaseException:  # a failure of the whole run: every finished result is written first
        writer.flush_all(unfinished | {r.id for r in by_index.values()})
        raise
    finally:
        ahead.close()
    if summary.interrupted:
        writer.flush_all(unfinished | {r.id for r in by_index.values()})
    return summary
