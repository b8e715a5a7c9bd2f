"""Server-sent events: the `data:` framing, and a streaming response that always closes its source.

Closing the source matters: the generator's `finally` cancels the engine sequence, so a client that
disconnects mid-stream frees its slot and KV cache at the engine's next step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
from starlette.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any], *, event: str | None = None) -> str:
    """One event: its JSON payload, named (`event: ...`, as the Responses API's events are) when `event` is given."""
    named = f"event: {event}\n" if event else ""
    return named + "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class EventStreamResponse(StreamingResponse):
    """text/event-stream that stops when the client disconnects and always runs the source's cleanup."""

    media_type = "text/event-stream"

    def __init__(self, content: Any, *, on_close: Callable[[], None] | None = None, **kwargs: Any) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch_disconnect)
                with contextlib.suppress(OSError):  # the client went away while we were writing
                    await self.stream_response(_yielding(send))
                group.cancel_scope.cancel()
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
            if self.on_close is not None:  # also when the source never started
                self.on_close()


def _yielding(send: Any) -> Any:
    """`send`, then a turn of the event loop. A write is what finds a client gone (a reset), and the server learns
    of it only at the loop's next turn: the events queued meanwhile (a busy loop) were written back to back into
    the closed socket, and asyncio logged "socket.send() raised exception." from the fifth on."""

    async def send_then_yield(message: Any) -> None:
        await send(message)
        await anyio.lowlevel.checkpoint()

    return send_then_yield
