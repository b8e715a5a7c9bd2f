"""Batch files: one JSON request per line in, one JSON result per line out, run concurrently.

The lines run through the local engine (`LocalLines`) or, in client mode, as concurrent requests to an
OpenAI-compatible server (`RemoteLines`: the server applies its chat template and batches them).

A request line is an object with `prompt` (text) or `messages` (chat messages), and optionally an
`id`, a `system` message, `raw` (no chat template) and per-line sampling settings (`temperature`,
`top_p`, `top_k`, `min_p`, `repetition_penalty`, `frequency_penalty`, `presence_penalty`, `max_tokens`,
`seed`, `stop`). A line that cannot
be run (bad JSON, unknown keys, a prompt over the context) becomes an error result for that line;
the run goes on. Results are written in input order as soon as every earlier line is done (no line starts
while MAX_HELD_RESULTS wait behind one still running), each line flushed and synced, so an interrupted
run keeps everything finished and `--resume` skips the ids already in the output. The lines of a pipe are
read ahead on a thread of their own, so a slow producer never stalls the lines running.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gptcli.config import SAMPLING_KNOBS, Settings, with_sampling
from gptcli.constraints import response_format
from gptcli.decoding import Event, Finished, Token
from gptcli.engine import Engine, run_all
from gptcli.errors import ConfigError, GptcliError, InputError
from gptcli.fanout import run_streams
from gptcli.jsonl import MAX_LINE_BYTES, READ_AHEAD, ReadAhead, ResultWriter, parse_line
from gptcli.prompts import MESSAGE_ROLES, build_prompt, fit_prompt, messages_for, transcript, transcript_sampling
from gptcli.tokenizer import Tokenizer

SAMPLING_KEYS = (*SAMPLING_KNOBS, "max_tokens", "seed", "stop")
REQUEST_KEYS = {"id", "prompt", "messages", "system", "raw", "response_format", *SAMPLING_KEYS}
FINISH_NAMES = {"context": "length"}  # OpenAI's names: a full context is a length stop
# Results held back for input order behind a line still running (a long first line, thousands of short ones
# after it, each finished and kept until the first is written): past this many, no line starts until the
# oldest unfinished one is done, so memory stays bounded however long the file.
MAX_HELD_RESULTS = 1024


@dataclass(frozen=True)
class BatchRequest:
    """One parsed line: what to run, or why it cannot run."""

    index: int
    id: str
    prompt_ids: list[int] = field(default_factory=list)  # run here: the prompt, templated and encoded
    settings: Settings | None = None
    messages: list[dict[str, str]] | None = None  # run on a server: the chat to send
    text: str | None = None  # run on a server: a `raw` prompt, sent to /v1/completions as is
    error: str | None = None
    numbered: bool = False  # the line has no `id`: its id is its line number


@dataclass
class BatchSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    completion_tokens: int = 0
    interrupted: bool = False


def _checked_messages(messages: Any) -> list[dict[str, str]]:
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
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _encode_messages(tokenizer: Tokenizer, messages: Any) -> list[int]:
    # As `gptcli chat` builds a conversation: the chat template, or a plain transcript for a base model.
    return build_prompt(tokenizer, _checked_messages(messages), plain=transcript).ids


def parse_request(
    number: int, raw: bytes | None, tokenizer: Tokenizer | None, settings: Settings, context_length: int
) -> BatchRequest:
    """Turn one line into a request; every problem becomes the line's error, never an exception.

    Without a tokenizer (the model is on a server) the request keeps its messages, or its raw text, to send."""
    line_id, numbered = str(number), True
    try:
        if raw is None:
            raise InputError(f"the line is over {MAX_LINE_BYTES // (1024 * 1024)} MiB")
        try:
            data = parse_line(raw)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not isinstance(data, dict):
            raise InputError("a line must be a JSON object")
        if "id" in data:
            if not isinstance(data["id"], (str, int)) or isinstance(data["id"], bool):
                raise InputError("`id` must be a string or a whole number")
            line_id, numbered = str(data["id"]), False
        unknown = sorted(set(data) - REQUEST_KEYS)
        if unknown:
            raise InputError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(REQUEST_KEYS))})")
        changes = {k: data[k] for k in SAMPLING_KEYS if k in data}
        line_settings = with_sampling(settings, "the line", **changes) if changes else settings
        if "response_format" in data:  # OpenAI's, as a server takes it: over the run's --json-schema/--format
            constraint = response_format(data["response_format"], "the line's `response_format`")
            line_settings = replace(line_settings, sampling=replace(line_settings.sampling, constraint=constraint))
        if "stop" in data and any(line_settings.sampling.stop) and line_settings.sampling.constraint is not None:
            raise InputError("`stop` does not go with structured output: the reply ends where its grammar does")
        system = data.get("system", line_settings.system)
        if ("prompt" in data) == ("messages" in data):
            raise InputError("give exactly one of `prompt` or `messages`")
        _check_prompt_options(data)
        if tokenizer is None:
            return BatchRequest(number, line_id, settings=line_settings, numbered=numbered, **_to_send(data, system))
        if "messages" in data:
            ids = _encode_messages(tokenizer, data["messages"])
            if len(ids) >= context_length:
                raise InputError(f"the prompt is {len(ids)} tokens but the model's context holds {context_length}")
            line_settings = replace(line_settings, sampling=transcript_sampling(line_settings.sampling, tokenizer))
        else:
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


def _to_send(data: dict, system: str | None) -> dict[str, Any]:
    """What a server is sent for a line: its messages, a prompt as a user message, or a raw prompt as text."""
    if "messages" in data:
        return {"messages": _checked_messages(data["messages"])}
    if data.get("raw"):
        return {"text": data["prompt"]}
    return {"messages": messages_for(data["prompt"], system)}


def _check_prompt_options(data: dict) -> None:
    """`system` and `raw` shape a `prompt` through the chat template: refuse what would be silently dropped."""
    if "prompt" in data and (not isinstance(data["prompt"], str) or not data["prompt"].strip()):
        raise InputError("`prompt` must be non-empty text")
    if "system" in data and not isinstance(data["system"], str):
        raise InputError("`system` must be text")
    if "raw" in data and not isinstance(data["raw"], bool):
        raise InputError("`raw` must be true or false")
    if "messages" in data and ("system" in data or "raw" in data):
        raise InputError('`system` and `raw` go with `prompt`; in `messages`, give a {"role": "system"} message')
    if data.get("raw") and "system" in data:
        raise InputError("`raw: true` sends the prompt without the chat template, so `system` would be dropped")


def result_record(request: BatchRequest, finished: Finished) -> dict[str, Any]:
    if finished.reason == "error":  # the line's output grammar could not go on (its own schema or format)
        return error_record(request.id, finished.error or "generation failed")
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
        self.engine.check_fits(len(request.prompt_ids), request.settings.sampling)

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
        return functools.partial(self.remote.chat, request.messages, params)


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
