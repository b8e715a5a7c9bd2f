"""A conversation with a model on an OpenAI-compatible server (`gptcli chat --url`).

The window goes to the server as messages and the server applies its own chat template. Sizes come
from the `tokenizer` given: the model's own when it is here or the server offers it, else an estimate
(see `gptcli.remote_tokens`). When the server reports its context, the oldest exchanges that would not
fit are dropped before sending, as in a local chat; whatever the count says, a server's "context length
exceeded" answer drops the oldest exchange and sends again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from gptcli.chat.conversation import Conversation, ConversationStore
from gptcli.chat.session import ChatSession, Turn
from gptcli.config import OutputConstraint, SamplingConfig, Settings
from gptcli.constraints import check
from gptcli.decoding import Event
from gptcli.errors import ContextLengthError, UsageError

MESSAGE_OVERHEAD = 4  # tokens a chat template adds around each message (role markers), roughly


class ChatServer(Protocol):
    """What the session needs of `gptcli.remote.RemoteModel`."""

    base_url: str

    def chat(self, messages: Sequence[Mapping[str, str]], params: SamplingConfig) -> Iterator[Event]: ...


class RemoteChatSession(ChatSession):
    """A ChatSession whose replies come from a server; saving, /commands and trimming are the local ones."""

    cached_tokens_are = "cached by the server"  # its prefix cache: from this chat's last turn or from anyone's

    def __init__(
        self,
        server: ChatServer,
        tokenizer: Any,
        settings: Settings,
        conversation: Conversation,
        store: ConversationStore | None = None,
        warn: Callable[[str], None] = lambda _: None,
        *,
        context_length: int | None = None,
    ) -> None:
        self.server = server
        self.server_context = context_length  # None: the server does not say
        super().__init__(None, tokenizer, settings, conversation, store, warn, reuse_context=False)

    def _fresh_cache(self) -> None:
        self.kv = None  # the server keeps (and re-uses) its own cache

    @property
    def context_length(self) -> int:
        return self.server_context or 0

    def where(self, backend_name: str) -> str:
        return f" (at {self.server.base_url})"

    def setting_note(self, key: str) -> str:
        # The stop works on the reply's token ids, which the server keeps; a server has no such setting to send.
        return " (not applied: the server decodes the reply)" if key == "repetition_stop" else ""

    def estimate(self, start: int | None = None) -> int:
        window = self.conversation.window(start)
        return sum(len(self.tokenizer.encode(m["content"])) + MESSAGE_OVERHEAD for m in window)

    def next_turn(self) -> tuple[int, int]:
        """As a local chat's, by the estimate: the window start the next message is sent with, at the latest,
        and the tokens sent before its own (the message's overhead included)."""
        conv = self.conversation
        head = self.estimate(len(conv.messages)) + MESSAGE_OVERHEAD  # the system message, the new one's markers
        costs = [len(self.tokenizer.encode(m["content"])) + MESSAGE_OVERHEAD for m in conv.messages]
        start = conv.window_start
        if self.server_context:
            limit = self.server_context - self.reserve()
            for start in [conv.window_start, *self._exchange_starts(conv.window_start, pending=True)]:
                if head + sum(costs[start:]) <= limit:
                    break
        return start, head + sum(costs[start:])

    def budget_line(self) -> str:
        per_reply = f"up to {self.settings.sampling.max_tokens} per reply"
        used, left = self.budget()
        if not self.server_context:
            return f"about {used} used; the server does not say its context ({per_reply})"
        return f"about {used} used / {left} left of {self.context_length} ({per_reply})"

    def fit(self) -> list[dict[str, str]]:  # type: ignore[override]
        """The window as messages, without the oldest exchanges that would not fit (by the estimate)."""
        if self.server_context:
            limit = self.server_context - self.reserve()
            while self.estimate() > limit and self.drop_oldest_exchange():
                pass
        self.prompt_tokens = self.estimate()
        return self.conversation.window()

    def check_output(self, constraint: OutputConstraint, where: str) -> None:
        """The server enforces the format: OpenAI's `response_format` has no regex or grammar (see cli.settings)."""
        if constraint.kind in ("regex", "grammar"):
            raise UsageError(
                f"{where}: a {constraint.kind} does not work with --url: OpenAI's API has no {constraint.kind} format",
                hint="use /format json or /format schema FILE here",
            )
        check(constraint, where)  # no prepare: the vocabulary is the server's

    def _reply(self, window: list[dict[str, str]]) -> Turn:  # type: ignore[override]
        """Send the window; on "context length exceeded", drop the oldest exchange and send again.

        The request is made here, not when the reply is read, so that a refusal is an error of this
        turn (the message is not kept) rather than one in the middle of streaming it.
        """
        while True:
            events = self.server.chat(window, self.settings.sampling)
            try:
                first = next(events)
            except ContextLengthError:
                if not self.drop_oldest_exchange():
                    raise
                window = self.conversation.window()
                continue
            return Turn(self, _prepend(first, events))


def _prepend(first: Event, events: Iterator[Event]) -> Iterator[Event]:
    """`first`, then the rest; closing it closes `events` (and so the connection)."""
    try:
        yield first
        yield from events
    finally:
        if hasattr(events, "close"):
            events.close()
