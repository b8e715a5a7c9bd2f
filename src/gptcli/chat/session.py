"""A conversation bound to a loaded model: fitting the context, turns, and the changes slash commands make.

Nothing here knows about terminals. One `KVSession` lives as long as the conversation, so each turn
prefills only what changed since the last one (usually the new user message).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from gptcli.chat.conversation import ChatFileError, Conversation, ConversationStore, new_id, now
from gptcli.coercion import suggest
from gptcli.config import FIELDS, OutputConstraint, SamplingConfig, Settings, with_output, with_sampling
from gptcli.constraints import check
from gptcli.decoding import Event, Finished, KVSession, Stats, Token
from gptcli.engine import generate
from gptcli.errors import GptcliError, InputError, UsageError
from gptcli.paths import environment_error
from gptcli.prompts import build_prompt, transcript, transcript_sampling

SAMPLING_KEYS = tuple(f.name for f in fields(SamplingConfig) if f"sampling.{f.name}" in FIELDS)


def parse_setting(key: str, value: str) -> Any:
    """A `/set` value as typed: `none` clears seed and stop, stop is comma-separated (the config engine checks it)."""
    if key not in SAMPLING_KEYS:
        raise UsageError(
            f"unknown setting '{key}'{suggest(key, list(SAMPLING_KEYS))}", hint="settings: " + ", ".join(SAMPLING_KEYS)
        )
    if key == "seed" and value.lower() in {"none", "null", "random"}:
        return None
    if key == "stop":  # `none`, as for seed (it was the stop string "none"; a literal one: `/set stop none,`)
        return () if value.lower() in {"none", "null"} else tuple(s for s in value.split(",") if s)
    return value


@dataclass
class Turn:
    """One reply in progress. Iterate for events; `close()` records whatever was said if iteration stopped."""

    chat: ChatSession
    events: Iterator[Event]
    text: str = ""
    finished: Finished | None = None
    recorded: bool = False

    def __iter__(self) -> Iterator[Event]:
        try:
            for event in self.events:
                if isinstance(event, Token):
                    self.text += event.text
                else:
                    self.finished = event
                    self.chat._record_reply(event.text, event.reason == "interrupted", event.stats)
                    self.recorded = True
                yield event
        except GptcliError:  # the reply broke off (a server's stream cut short): kept as far as it came, as Ctrl-C
            if not self.recorded:
                self.chat._record_reply(self.text, True, None)
                self.recorded = True
            raise

    def close(self) -> None:
        """Stop generating; keep the partial reply (marked interrupted)."""
        if hasattr(self.events, "close"):
            self.events.close()
        if not self.recorded:
            self.chat._record_reply(self.text, True, None)
            self.recorded = True

    @property
    def interrupted(self) -> bool:
        return self.finished is None or self.finished.reason == "interrupted"


class ChatSession:
    """A conversation bound to a loaded model: fits the context, generates, saves after every change."""

    cached_tokens_are = "reused from the last turn"  # /stats: where a turn's cached prompt tokens came from

    def __init__(
        self,
        backend: Any,
        tokenizer: Any,
        settings: Settings,
        conversation: Conversation,
        store: ConversationStore | None = None,
        warn: Callable[[str], None] = lambda _: None,
        reuse_context: bool = True,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.conversation = conversation
        self.store = store
        self.warn = warn
        self.reuse_context = reuse_context
        self.settings = settings
        self.output_source = ""  # what set the output format, for /show: a flag, `/format KIND`; "" its chat file
        if conversation.sampling:
            self.settings = with_sampling(settings, **conversation.sampling)
        if conversation.output is not None:  # a resumed chat's too: compiled for this model (a regex: not over --url)
            self.check_output(conversation.output, f"conversation {conversation.id}: its output format")
        self._fresh_cache()
        self.last_stats: Stats | None = None
        self.save_error: GptcliError | None = None
        self.prompt_tokens = 0
        self._warned_trim = False
        self.own_files: set[Path] = set()  # files /save wrote or /load read: /save may replace them

    # -- context ---------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.backend.info.context_length)

    def _fresh_cache(self) -> None:
        """An empty KV cache: the next turn prefills the whole window."""
        self.kv = KVSession(self.backend)

    def setting_note(self, key: str) -> str:
        """What /show adds after a sampling setting's value: nothing where the setting applies as shown."""
        return ""

    def where(self, backend_name: str) -> str:
        """Where the model runs, for /show."""
        return f" ({backend_name}/{self.backend.info.device})" if backend_name else ""

    def budget_line(self) -> str:
        """The /show line on the token budget: what the next turn sends before the message's own tokens."""
        used, left = self.budget()
        return (
            f"{used} used / {left} left of {self.context_length} (up to {self.settings.sampling.max_tokens} per reply)"
        )

    def reserve(self) -> int:
        """Room kept free for the reply."""
        return max(1, min(self.settings.sampling.max_tokens, self.context_length // 2))

    def encode_window(self, start: int | None = None, then: tuple[dict[str, str], ...] = ()) -> list[int]:
        """The prompt of the window from `start` (default: where it starts now), with `then` after it."""
        return build_prompt(self.tokenizer, [*self.conversation.window(start), *then], plain=transcript).ids

    def _fitting(self, then: tuple[dict[str, str], ...] = ()) -> tuple[int, list[int], bool]:
        """(the window start a turn uses, its prompt ids, whether they fit), with `then` after the messages: the
        current start if it fits, else the first later exchange's that does, else the last one's (no fit).

        Found by bisection over the exchanges' starts (fewer messages never make more tokens), so a chat of
        thousands of messages costs a few encodings, not one per exchange. Nothing changes."""
        start = self.conversation.window_start
        limit = self.context_length - self.reserve()
        ids = self.encode_window(start, then)
        if len(ids) <= limit:
            return start, ids, True
        starts = self._exchange_starts(start, pending=bool(then))
        low, high = 0, len(starts)  # starts[high:] fit (high == len: none known to)
        while low < high:
            middle = (low + high) // 2
            if len(self.encode_window(starts[middle], then)) <= limit:
                high = middle
            else:
                low = middle + 1
        if high == len(starts):
            return (starts[-1], self.encode_window(starts[-1], then), False) if starts else (start, ids, False)
        return starts[high], self.encode_window(starts[high], then), True

    def fit(self) -> list[int]:
        """Prompt ids for the window, dropping the oldest exchanges (never the system message) to fit."""
        start, ids, fits = self._fitting()
        if not fits:
            room = self.context_length - len(ids)  # the most max_tokens may be for it to fit
            raise InputError(
                f"the message needs {len(ids)} tokens with the chat template; "
                f"the context holds {self.context_length} with {self.reserve()} kept for the reply",
                hint=f"shorten it, or lower max_tokens with /set max_tokens {room}" if room > 0 else "shorten it",
            )
        if start != self.conversation.window_start:
            self.conversation.window_start = start
            self._warn_trim()
        self.prompt_tokens = len(ids)
        return ids

    def next_turn(self) -> tuple[int, int]:
        """(the window start the next message is sent with, at the latest, tokens sent before its own): the
        window trimmed as that turn will trim it, a long last reply may leave no room for older exchanges."""
        try:
            start, ids, _ = self._fitting(({"role": "user", "content": ""},))
        except GptcliError:  # a chat template that fails on this window: the last turn's count
            return self.conversation.window_start, self.prompt_tokens
        return start, len(ids)

    def drop_oldest_exchange(self) -> bool:
        """Stop sending the oldest exchange (never the system message, nor the last user message)."""
        starts = self._exchange_starts(self.conversation.window_start)
        if not starts:
            return False
        self.conversation.window_start = starts[0]
        self._warn_trim()
        return True

    def _warn_trim(self) -> None:
        if not self._warned_trim:
            self.warn(
                "the conversation outgrew the context: the oldest exchanges are no longer sent to the model "
                "(they stay saved; /show says how many)"
            )
            self._warned_trim = True

    def _exchange_starts(self, start: int, *, pending: bool = False) -> list[int]:
        """Where the window could start after `start`: each later user message, the last one included (it is
        always sent), or, with a user message `pending` after the messages, where that one will be."""
        msgs = self.conversation.messages
        users = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "user"]
        return users[1:] + ([len(msgs)] if pending and users else [])

    # -- turns -----------------------------------------------------------------------------------

    def say(self, text: str) -> Turn:
        """Append a user message (saved at once) and start the reply."""
        if not text.strip():
            raise InputError("the message is empty")
        conv = self.conversation
        conv.messages.append({"role": "user", "content": text, "time": now()})
        start = conv.window_start

        def take_back() -> None:  # the message is not kept, and nothing was dropped for it
            conv.messages.pop()
            conv.window_start = start

        try:
            turn = self._reply(self.fit())
        except GptcliError:  # not sent: too long, or a server that refused it
            take_back()
            raise
        try:
            self.save(strict=True)
        except ChatFileError as exc:  # the chat is full: the store keeps it as it was
            if hasattr(turn.events, "close"):
                turn.events.close()
            take_back()
            raise InputError(f"cannot add the message: {exc.message}", hint=exc.hint) from None
        return turn

    def retry(self) -> Turn:
        """Drop the last reply and generate it again for the same user message."""
        msgs = self.conversation.messages
        if not msgs:
            raise UsageError("nothing to retry yet")
        if msgs[-1]["role"] == "assistant":
            msgs.pop()
        return self._reply(self.fit())

    def _reply(self, ids: list[int]) -> Turn:
        if not self.reuse_context:
            self._fresh_cache()
        sampling = transcript_sampling(self.settings.sampling, self.tokenizer)
        return Turn(self, generate(self.backend, self.tokenizer, ids, sampling, session=self.kv))

    def _record_reply(self, text: str, interrupted: bool, stats: Stats | None) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text, "time": now()}
        if interrupted:
            message["interrupted"] = True
            # An interrupt can land inside a forward pass and leave the cache half-written: start clean.
            self._fresh_cache()
        if stats is not None:
            self.last_stats = stats
            message["stats"] = stats.as_dict()
        self.conversation.messages.append(message)
        self.save()

    def undo(self) -> int:
        """Drop the last exchange (the last user message and what followed it); returns messages removed."""
        msgs = self.conversation.messages
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise UsageError("nothing to undo")
        removed = len(msgs) - users[-1]
        del msgs[users[-1] :]
        self.conversation.window_start = min(self.conversation.window_start, len(msgs))
        self.save()
        return removed

    def reset(self) -> None:
        """Start a new conversation with the same model, system message, chat template and settings."""
        old = self.conversation
        self.conversation = Conversation(
            model=old.model,
            system=old.system,
            sampling=dict(old.sampling),
            output=old.output,
            chat_template=old.chat_template,
        )
        self._warned_trim = False

    def load(self, conv: Conversation) -> None:
        """Continue a conversation loaded from a file, as a new saved conversation, with its output format
        (one without keeps the current one). One the store could not read back is refused (ChatFileError)
        and the chat goes on as it was."""
        before = self.conversation, self.settings, self._warned_trim
        output = conv.output if conv.output is not None else self.conversation.output
        if output is not None and output != self.conversation.output:
            self.check_output(output, "the file's output format")
        source = "" if conv.output is not None else self.output_source
        held = self.conversation  # its model renders the loaded chat, with the chat template it was opened with
        conv = replace(conv, id=new_id(), model=held.model, chat_template=held.chat_template, output=output)
        settings = with_sampling(self.settings, **conv.sampling) if conv.sampling else self.settings  # may refuse
        self.conversation, self.settings = conv, with_output(settings, output)
        self._warned_trim = False
        try:
            self.save(strict=True)
        except ChatFileError:
            self.conversation, self.settings, self._warned_trim = before
            raise
        self.output_source = source

    def check_output(self, constraint: OutputConstraint, where: str) -> None:
        """Compile a new output format against this model's vocabulary (a ConfigError naming what asked for it:
        its file or `/format regex`, else `where`)."""
        from gptcli.constraints import prepare

        check(constraint, where)
        prepare(constraint, self.tokenizer, constraint.where or where)

    def set_output(self, constraint: OutputConstraint | None, source: str = "") -> None:
        """Follow another output format from the next reply on (None: free text); the chat file keeps it. `source`
        says what set it (`/format grammar`), for /show."""
        if constraint is not None:
            self.check_output(constraint, "/format")
            if any(self.settings.sampling.stop):
                self.warn("stop strings are ignored with structured output: it ends where its grammar does")
        self.settings = with_output(self.settings, constraint)
        self.conversation.output, self.output_source = constraint, source
        self.save()

    def set_system(self, text: str) -> None:
        self.conversation.system = text or None
        self.save()

    def set_sampling(self, key: str, raw: str) -> Any:
        value = parse_setting(key, raw)
        if key == "stop" and value and self.settings.sampling.constraint is not None:
            raise UsageError(
                "/set stop: stop strings do not go with structured output (it ends where its grammar does)",
            )
        self.settings = with_sampling(self.settings, "/set", **{key: value})
        stored = getattr(self.settings.sampling, key)
        self.conversation.sampling[key] = list(stored) if isinstance(stored, tuple) else stored
        self.save()
        return stored

    def save(self, *, strict: bool = False) -> None:
        """Save to the store. A store that cannot be written (a read-only home, a full disk) is warned about
        once and the chat goes on; `save_error` holds the error until a later save succeeds. So is a
        conversation the store could not read back (grown past the chat-file limit), unless `strict`:
        then that raises ChatFileError, and nothing is written."""
        if self.store is None:
            return
        error: GptcliError
        try:
            if self.conversation.messages:
                old_id = self.conversation.id
                self.store.save(self.conversation)
                if self.conversation.id != old_id:
                    self.warn(f"another gptcli chat changed {old_id}: this chat is saved on as {self.conversation.id}")
            else:  # /undo of its only exchange: the stored copy goes too, not left behind to --continue
                self.store.discard(self.conversation.id)
        except ChatFileError as exc:
            if strict:
                raise
            error = exc
        except GptcliError as exc:  # a write the store turned into a one-line error
            error = exc
        except OSError as exc:
            error = environment_error(exc) or GptcliError(f"cannot save the conversation: {exc}")
        else:
            self.save_error = None
            return
        if self.save_error is None:
            self.warn(f"{error.message}: the chat goes on unsaved (/save FILE.json keeps a copy elsewhere)")
        self.save_error = error

    def budget(self) -> tuple[int, int]:
        """(tokens the next turn sends before its message's own, tokens left in the context)."""
        used = self.next_turn()[1]
        return used, max(self.context_length - used, 0)
