"""A small client for any OpenAI-compatible server that yields the local loop's events.

`RemoteModel.chat()` and `.complete()` stream from /v1/chat/completions and /v1/completions and
yield `Token`s then one `Finished` with `Stats`, exactly like `gptcli.engine.generate`, so chat,
generate and summarize render a remote model unchanged. Server errors (HTTP status with OpenAI's
error body), refused connections and timeouts become GptcliError subclasses with one-line messages.
HTTP itself (httpx, or the standard library) is gptcli.remote_http.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from gptcli.config import SamplingConfig
from gptcli.decoding import Event, Finished, Token
from gptcli.errors import GptcliError, ModelError, RemoteError, UsageError
from gptcli.fanout import run_streams
from gptcli.remote_answers import count, parse_chunk, redirect_error, status_error, streamed_stats
from gptcli.remote_http import Reply, default_opener, retry_after
from gptcli.remote_requests import DEFAULTS, sampling_fields
from gptcli.tool_reply import StreamedCalls

DEFAULT_TIMEOUT_S = 600.0  # as OpenAI's own client: a busy server's queue, then a long answer not streamed
LOOKUP_TIMEOUT_S = 30.0
MAX_ERROR_BYTES = 65536  # of an error answer's body: its message is in the first line or two
MAX_JSON_BYTES = 16 << 20  # of a whole JSON answer (/models, /tokenize, an answer that was not streamed)
CONNECT_HINT = "is the server running? (`gptcli serve` starts one; the URL usually ends in /v1)"
GONE_HINT = "it answered earlier in this run: did the server stop or restart?"
MIN_RETRY_S = 0.25  # the least wait before sending again after a busy answer (a "Retry-After: 0" too)
# A server may not keep max_tokens (one that never ends its stream): a reply is cut past these, per token asked.
REPLY_CHARS_PER_TOKEN = 64  # of text and tool calls' arguments (a token is 4 characters on average)
REPLY_EVENTS_PER_TOKEN = 4  # of data lines (one a token in practice, and a few more: the role, the end, usage)
REPLY_EVENTS_MORE = 16  # ... and these more


class RemoteModel:
    """One model behind an OpenAI-compatible base URL (…/v1)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        opener: Callable[..., Reply] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if self.api_key and not (self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key):
            raise UsageError(  # never echoed: it is a secret
                "the API key (--api-key or OPENAI_API_KEY) holds characters an HTTP header cannot carry",
                hint="check the key: keys are printable ASCII without spaces",
            )
        self.timeout = timeout or DEFAULT_TIMEOUT_S  # a stream's first byte may wait for a busy server's queue
        self.lookup_timeout = min(self.timeout, LOOKUP_TIMEOUT_S)  # /models, /tokenize: answered at once by any server
        self.connect_timeout = connect_timeout
        self._open = opener or default_opener()
        self._model = model
        self._card: dict[str, Any] | None = None
        self._answered = False  # a request had an answer: a later failure to connect is the server gone, not the URL

    # --- requests -------------------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        """The server itself: the base URL without its /v1 (where /tokenize, /health and /metrics live)."""
        return self.base_url.removesuffix("/v1")

    def _request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        at_root: bool = False,
        timeout: float | None = None,
    ) -> Reply:
        headers = {"Accept": "application/json, text/event-stream"}
        body = None
        if payload is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(payload).encode()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = (self.root_url if at_root else self.base_url) + path
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        busy: GptcliError | None = None  # the last "busy, retry after" answer, while waiting to send again
        while True:
            try:
                reply = self._open(method, url, headers, body, timeout, self.connect_timeout)
                reply.deadline, reply.timeout = deadline, timeout
            except TimeoutError:
                raise busy or self._timeout_error(timeout) from None
            except ConnectionError as exc:
                # not a wrong scheme or port (its hint): it answered this run (busy, perhaps), then went away
                if self._answered:
                    raise RemoteError(f"lost {self.base_url}: {exc}", hint=GONE_HINT) from None
                raise RemoteError(
                    f"cannot connect to {self.base_url}: {exc}",
                    hint=getattr(exc, "hint", None) or CONNECT_HINT,
                ) from None
            self._answered = True
            if reply.status < 300:
                return reply
            if reply.status < 400:
                reply.close()
                raise redirect_error(self.base_url, reply, url, path)
            wait = retry_after(reply) if reply.status in (429, 503) else None
            busy = self._status_error(reply, path)
            # A full queue (or a rate limit) that says when to come back: wait, as the request would have
            # waited in a queue with room, for as long as the request's own timeout allows.
            if wait is None or time.monotonic() + wait >= deadline:
                raise busy
            time.sleep(max(wait, MIN_RETRY_S))

    def _timeout_error(self, waited: float) -> RemoteError:
        """No answer (or no next line of one) in `waited` seconds: --timeout's, or a lookup's shorter wait."""
        longer = " (--timeout SECONDS waits longer)" if waited >= self.timeout else ""
        return RemoteError(f"{self.base_url} did not answer in {waited:g} s", hint=f"is the server overloaded?{longer}")

    def _status_error(self, reply: Reply, path: str = "") -> GptcliError:
        """An error status as the GptcliError it means, with the server's own message (status_error)."""
        try:  # answered at once by any server: neither a large body nor a slow one is waited for
            text = reply.text(MAX_ERROR_BYTES, min(reply.deadline, time.monotonic() + self.lookup_timeout))
        except (TimeoutError, ConnectionError):
            text = ""
        retry = retry_after(reply) if reply.status in (429, 503) else None
        return status_error(self.base_url, reply.status, text, retry, path)

    def post_json(self, path: str, payload: dict[str, Any], *, at_root: bool = False) -> Any:
        """POST `payload` to `path` (under the base URL, or the server's root) and read the JSON answer."""
        where = (self.root_url if at_root else self.base_url) + path
        reply = self._request("POST", path, payload, at_root=at_root, timeout=self.lookup_timeout)
        return self._read_json(reply, where)

    def _json(self, path: str) -> Any:
        return self._read_json(self._request("GET", path, timeout=self.lookup_timeout), self.base_url + path)

    def _read_json(self, reply: Reply, where: str) -> Any:
        try:
            return json.loads(self._whole_body(reply, where))
        except ValueError:
            raise RemoteError(f"{where} did not answer with JSON", hint="is this an OpenAI-style URL?") from None

    def _whole_body(self, reply: Reply, where: str) -> bytes:
        """A body read whole, by the request's deadline (a server sending a byte at a time does not hold us)."""
        try:
            data = reply.body(MAX_JSON_BYTES + 1)
        except TimeoutError:
            raise self._timeout_error(reply.timeout) from None
        except ConnectionError as exc:
            raise RemoteError(f"{self.base_url}: the connection failed while reading: {exc}") from None
        if len(data) > MAX_JSON_BYTES:
            raise RemoteError(
                f"{where} answered more than {MAX_JSON_BYTES >> 20} MiB", hint="is this an OpenAI-style URL?"
            )
        return data

    # --- models -----------------------------------------------------------------------------------
    def models(self) -> list[dict[str, Any]]:
        data = self._json("/models")
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            raise RemoteError(f"{self.base_url}/models did not list models")
        named = [card for card in cards if isinstance(card, dict) and isinstance(card.get("id"), str)]
        if cards and not named:  # entries, but none a request could name
            raise RemoteError(f"{self.base_url}/models listed no model with an id", hint="name it with --model NAME")
        return named

    @property
    def model(self) -> str:
        """The model asked for, or the server's first one."""
        if self._model is None:
            cards = self.models()
            if not cards:
                raise ModelError(f"{self.base_url} serves no model")
            self._card = cards[0]
            self._model = cards[0]["id"]
        return self._model

    @property
    def context_length(self) -> int | None:
        """The served model's context, where the server says it: max_model_len (gptcli serve, vLLM), context_length,
        or meta.n_ctx (llama-server: what one of its slots holds, not the model's n_ctx_train)."""
        card = self._served_card()  # a count of tokens, or unknown: not a negative one, nor true taken for 1
        return count(card, "max_model_len") or count(card, "context_length") or count(card.get("meta"), "n_ctx") or None

    @property
    def templated(self) -> bool | None:
        """Whether the served model has a chat template, where the server says it (gptcli serve's
        has_chat_template); None when it does not say (most servers: their models have one)."""
        said = self._served_card().get("has_chat_template")
        return said if isinstance(said, bool) else None

    def _served_card(self) -> dict[str, Any]:
        """The served model's entry in /models (an empty one when it is not listed), asked once."""
        if self._card is None:
            self._card = next((c for c in self.models() if c.get("id") == self.model), {})
        return self._card

    # --- generation -------------------------------------------------------------------------------
    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: SamplingConfig,
        tools: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Iterator[Event]:
        """The chat's events; with `tools` (OpenAI's tools, tool_choice, parallel_tool_calls) the last one is a
        CallsFinished holding the calls the server made, or its text. `extra`: more request fields, as they are."""
        payload = {"messages": [dict(m) for m in messages], **self._sampling(params), **(tools or {}), **(extra or {})}
        return self._stream("/chat/completions", payload, chat=True, calls=StreamedCalls() if tools else None)

    def complete(self, prompt: str, params: SamplingConfig) -> Iterator[Event]:
        return self._stream("/completions", {"prompt": prompt, **self._sampling(params)}, chat=False)

    def chat_many(
        self,
        requests: Sequence[Sequence[Mapping[str, str]]],
        params: SamplingConfig,
        parallel: int,
        as_text: Callable[[Any], str] | None = None,
    ) -> Iterator[tuple[int, Event]]:
        """(request index, event) for many chats sent `parallel` at a time from threads, so the server
        batches them (as `engine.run_all` does locally). Ctrl-C stops them all: unfinished ones end "interrupted".
        `as_text`: each chat sent as this text to complete (a served model without a chat template)."""
        if as_text is not None:
            starts = (functools.partial(self.complete, as_text(messages), params) for messages in requests)
        else:
            starts = (functools.partial(self.chat, messages, params) for messages in requests)
        for index, event in run_streams(starts, parallel):
            if isinstance(event, GptcliError):
                raise event
            yield index, event

    def _sampling(self, params: SamplingConfig) -> dict[str, Any]:
        return sampling_fields(params, self.model)

    def _stream(
        self, path: str, payload: dict[str, Any], *, chat: bool, calls: StreamedCalls | None = None
    ) -> Iterator[Event]:
        start = time.perf_counter()
        try:
            reply = self._request("POST", path, payload)
        except KeyboardInterrupt:  # while a busy server queues it: the reply ends before its first token
            yield Finished("interrupted", streamed_stats(start, None, time.perf_counter(), 0), "", ())
            return
        try:
            yield from self._read(reply, payload, start, chat=chat, calls=calls)
        except GptcliError as exc:  # the answer had begun (a 200): it broke off, with or without text before
            exc.mid_answer = True  # type: ignore[attr-defined]
            raise

    def _read(
        self, reply: Reply, payload: dict[str, Any], start: float, *, chat: bool, calls: StreamedCalls | None
    ) -> Iterator[Event]:
        """The events of an answer that has begun (its status was a success), as they stream."""
        pieces: list[str] = []
        first_at: float | None = None
        reason: str | None = None
        usage: dict[str, Any] = {}
        chunks = size = 0
        done = False
        max_tokens = payload.get("max_tokens") or DEFAULTS.max_tokens
        most = max_tokens * REPLY_CHARS_PER_TOKEN
        try:
            for chunk in self._chunks(reply, chat=chat, max_tokens=max_tokens):
                if chunk is None:
                    done = True
                    break
                usage = chunk.get("usage") if isinstance(chunk.get("usage"), dict) else usage
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        first_at = first_at or now
                        chunks += 1
                        size += len(text)
                        pieces.append(text)
                        yield Token(text, None, now)
                    reason = choice.get("finish_reason") or reason
                    if calls is not None and (called := (choice.get("delta") or {}).get("tool_calls")):
                        size += len(json.dumps(called))
                        calls.add(called)
                if size > most:
                    raise self._endless(f"more than {most} characters", max_tokens)
        except KeyboardInterrupt:
            reason, done = "interrupted", True
        except TimeoutError:
            raise self._timeout_error(reply.timeout) from None
        except ConnectionError as exc:
            raise RemoteError(f"{self.base_url}: the connection broke mid-answer: {exc}") from None
        finally:
            reply.close()
        if not done and reason is None:
            raise RemoteError(f"{self.base_url} closed the stream before the answer finished")
        stats = streamed_stats(
            start,
            first_at,
            time.perf_counter(),
            count(usage, "completion_tokens") or chunks,
            prompt_tokens=count(usage, "prompt_tokens"),
            cached_tokens=count(usage.get("prompt_tokens_details"), "cached_tokens") or 0,
        )
        finished = Finished(_REASON_NAMES.get(reason or "stop", "stop"), stats, "".join(pieces), ())
        yield finished if calls is None else calls.finished(finished)

    def _endless(self, what: str, max_tokens: int) -> RemoteError:
        return RemoteError(
            f"{self.base_url} sent {what} for a reply of at most {max_tokens} tokens: cut there",
            hint="the server does not keep max_tokens: is it an OpenAI-compatible server?",
        )

    def _rest(self, first: str, lines: Iterator[str], reply: Reply) -> str:
        """A whole answer's text from its `first` line on, within a whole answer's limits (size and deadline)."""
        text, size = [first], len(first)
        for line in lines:
            text.append(line)
            size += len(line) + 1
            if size > MAX_JSON_BYTES:
                raise RemoteError(f"{self.base_url} answered more than {MAX_JSON_BYTES >> 20} MiB")
            if time.monotonic() > reply.deadline:
                raise TimeoutError("the answer did not end in time")
        return "\n".join(text)

    def _chunks(self, reply: Reply, *, chat: bool, max_tokens: int) -> Iterator[dict[str, Any] | None]:
        """The stream's chunks, then None at its end ([DONE]). A server that ignores `stream` and sends the
        whole answer as one JSON object (Content-Type application/json) gives it as one chunk and its end.

        Only data lines are progress: comments and blank lines (keep-alives) do not stop the wait for the
        next one from timing out, and data lines past REPLY_EVENTS_PER_TOKEN a token asked (and
        REPLY_EVENTS_MORE) are cut."""
        content_type = (reply.header("Content-Type") or "").lower()
        lines = reply.lines(idle_s=self.timeout)  # a long answer, but never a long wait for its next line
        if "application/json" in content_type and "event-stream" not in content_type:
            whole = self._whole_body(reply, self.base_url).decode("utf-8", errors="replace")
            if not whole.lstrip().startswith(("data:", ":", "event:")):
                yield parse_chunk(whole, self.base_url, chat=chat, whole=True)
                yield None
                return
            lines = iter(whole.splitlines())  # a stream labelled JSON (a proxy's doing): read whole, then as one
        most = max_tokens * REPLY_EVENTS_PER_TOKEN + REPLY_EVENTS_MORE
        events, last = 0, time.monotonic()
        for line in lines:
            if not line.startswith("data:"):  # blank separators, ": comments", "event:" lines
                if events == 0 and line.startswith("{"):  # a whole answer labelled otherwise (text/plain, none)
                    yield parse_chunk(self._rest(line, lines, reply), self.base_url, chat=chat, whole=True)
                    yield None
                    return
                if time.monotonic() - last > self.timeout:
                    raise TimeoutError(f"no data in {self.timeout:g} s")
                continue
            events += 1
            if events > most:
                raise self._endless(f"more than {most} events", max_tokens)
            data = line[5:].strip()
            try:
                chunk = None if data == "[DONE]" else parse_chunk(data, self.base_url, chat=chat)
            except RemoteError:
                if reply.cut:  # not what it sent: what came of it before the connection closed
                    raise RemoteError(
                        f"{self.base_url} closed the stream mid-line, before the answer finished"
                    ) from None
                raise
            yield chunk
            last = time.monotonic()  # (the time the caller spends on a chunk is not the server's)


_REASON_NAMES = {"stop": "stop", "length": "length", "interrupted": "interrupted"}
