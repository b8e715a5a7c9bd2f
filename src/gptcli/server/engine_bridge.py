"""From the engine's thread to the event loop: one sequence's events as an async iterator.

The engine calls `on_event` from its own thread; the event hops onto the loop with
`call_soon_threadsafe`. Leaving the iterator early (client gone, task cancelled) cancels the
sequence in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from starlette.requests import Request

from gptcli.config import SamplingConfig
from gptcli.decoding import Event, Finished
from gptcli.errors import FieldError, InputError
from gptcli.server.errors import APIError, field_error


class EngineLike(Protocol):
    """What the server needs of gptcli.engine.Engine."""

    limits: Any  # gptcli.engine.EngineLimits: max_running, max_queue
    kv_budget: int

    def check_fits(self, prompt_tokens: int, params: SamplingConfig) -> int: ...

    def submit(self, prompt_ids: Sequence[int], params: SamplingConfig, *, on_event: Any = None) -> Any: ...
    def cancel(self, handle: Any) -> None: ...
    def snapshot(self) -> Any: ...
    def start(self) -> None: ...
    def stop(self, grace_s: float = 0.0) -> None: ...


def check_fits(
    engine: EngineLike,
    prompts: list[list[int]],
    params: SamplingConfig,
    *,
    prompt_param: str,
    tokens_param: str = "max_tokens",
) -> None:
    """A request the KV budget can never hold: a 400 in the request's own terms, naming what would make it fit
    (fewer tokens asked for in `tokens_param`, or a shorter prompt when the prompt alone fills the budget)."""
    for ids in prompts:
        try:
            engine.check_fits(len(ids), params)
        except FieldError as exc:  # min_tokens past what the context holds after the prompt
            raise field_error(exc) from None
        except InputError as exc:
            server = "the server's --kv-budget sets the budget"
            if len(ids) >= engine.kv_budget:
                message = f"{prompt_param}: {exc.message}; shorten it ({server})"
                raise APIError(400, message, param=prompt_param, code="context_length_exceeded") from None
            message = f"{tokens_param}: {exc.message}; ask for fewer tokens ({server})"
            raise APIError(400, message, param=tokens_param, code="invalid_value") from None


class EngineStream:
    """Submit on construction (errors such as a full queue raise here, before any response starts)."""

    def __init__(self, engine: EngineLike, prompt_ids: Sequence[int], params: SamplingConfig) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.finished: Finished | None = None
        self.cancelled = False
        self.handle = engine.submit(prompt_ids, params, on_event=self._on_event)

    def _on_event(self, event: Event) -> None:
        # Runs in the engine's thread: it must be quick and never raise (the loop may be closing).
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Event]:
        try:
            while self.finished is None:
                event = await self.queue.get()
                if isinstance(event, Finished):
                    self.finished = event
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Idempotent: the engine hears of it once, and not at all once the sequence has finished."""
        if self.finished is None and not self.cancelled:
            self.cancelled = True
            self.engine.cancel(self.handle)


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
