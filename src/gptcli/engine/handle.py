"""The caller's side of a submitted sequence: its id, its result, and (without a callback) its event queue."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from gptcli.decoding import Event, Finished


class SequenceHandle:
    """The caller's side of one submitted sequence: its id and, without a callback, its event queue."""

    def __init__(self, seq_id: int, prompt_tokens: int, on_event: Callable[[Event], None] | None) -> None:
        self.id = seq_id
        self.prompt_tokens = prompt_tokens
        self.done = False
        self.result: Finished | None = None
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._on_event = on_event

    def _deliver(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.done = True
            self.result = event
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._queue.put(event)

    def _pending(self) -> Iterator[Event]:
        """Events already delivered, without waiting."""
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Block for this sequence's events until its Finished (for a background engine)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, Finished):
                return
