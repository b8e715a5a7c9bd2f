"""Conversations: the model of a chat, where it is saved, how it fits the context, and the slash commands.

Nothing here knows about terminals: the REPL in `gptcli.cli.chat_cmd` reads lines and renders events;
this module turns lines into turns and commands. One `KVSession` lives as long as the conversation, so
each turn prefills only what changed since the last one (usually the new user message).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gptcli.atomicio import write_atomic
from gptcli.config import SamplingConfig, Settings, with_sampling
from gptcli.decoding import Event, Finished, KVSession, Stats, Token, generate
from gptcli.errors import ConfigError, GptcliError, InputError, UsageError
from gptcli.paths import data_dir

FORMAT_VERSION = 1


def chats_dir() -> Path:
    return data_dir() / "chats"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class Conversation:
    """A saved chat. `window_start` is the first message still sent to the model (older ones were
    trimmed to fit the context; they stay in the file)."""

    id: str = field(default_factory=new_id)
    model: str = ""
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # /set changes, re-applied on resume
    window_start: int = 0
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)

    @property
    def title(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        line = " ".join(first.split())
        return line[:60] + ("…" if len(line) > 60 else "")

    def window(self) -> list[dict[str, str]]:
        """The messages the model sees: the system message, then the untrimmed history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[self.window_start :]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "created": self.created,
            "updated": self.updated,
            "system": self.system,
            "sampling": self.sampling,
            "window_start": self.window_start,
            "messages": self.messages,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise InputError(f"{where} is not a saved gptcli conversation", hint="it needs a 'messages' list")
        messages = []
        for m in data["messages"]:
            if not isinstance(m, dict) or m.get("role") not in {"user", "assistant", "system"}:
                raise InputError(f"{where}: each message needs a role (user/assistant) and content")
            if m["role"] == "system":  # a plain OpenAI-style list: lift the system message out
                data = {**data, "system": str(m.get("content", ""))}
                continue
            messages.append({**m, "content": str(m.get("content", ""))})
        conv = cls(
            id=str(data.get("id") or new_id()),
            model=str(data.get("model") or ""),
            system=data.get("system"),
            messages=messages,
            sampling=dict(data.get("sampling") or {}),
            window_start=int(data.get("window_start") or 0),
        )
        conv.created = str(data.get("created") or conv.created)
        conv.updated = str(data.get("updated") or conv.updated)
        return conv


def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title or 'Conversation'}", "", f"*{conv.id} · {conv.model} · {conv.created}*", ""]
    if conv.system:
        lines += ["**System:** " + conv.system, ""]
    for m in conv.messages:
        who = "You" if m["role"] == "user" else "Assistant"
        mark = " *(interrupted)*" if m.get("interrupted") else ""
        lines += [f"### {who}{mark}", "", m["content"], ""]
    return "\n".join(lines).rstrip() + "\n"


def read_conversation_file(path: Path) -> Conversation:
    """Load a conversation saved as JSON (by /save, `chats export` or the store)."""
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: only JSON conversations can be loaded", hint="save with /save FILE.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if isinstance(data, list):
        data = {"messages": data}
    return Conversation.from_dict(data, str(path))


def write_conversation_file(conv: Conversation, path: Path) -> str:
    """Save as Markdown (.md) or JSON (.json); returns the format used."""
    suffix = path.suffix.lower()
    if suffix in {".md", ".markdown"}:
        write_atomic(path, to_markdown(conv), mode=0o600)
        return "markdown"
    if suffix == ".json":
        write_atomic(path, json.dumps(conv.to_dict(), ensure_ascii=False, indent=2) + "\n", mode=0o600)
        return "json"
    raise UsageError(f"cannot tell the format of {path.name}", hint="name it .md (Markdown) or .json")


class ConversationStore:
    """One JSON file per conversation in the gptcli data folder (mode 0600, written atomically)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or chats_dir()

    def path(self, conv_id: str) -> Path:
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        conv.updated = _now()
        path = self.path(conv.id)
        write_atomic(path, json.dumps(conv.to_dict(), ensure_ascii=False, indent=2) + "\n", mode=0o600)
        return path

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))

    def list(self) -> list[Conversation]:
        """Every saved conversation, most recently updated first (unreadable files are skipped)."""
        found = []
        for conv_id in self.ids():
            try:
                found.append(read_conversation_file(self.path(conv_id)))
            except GptcliError:
                continue
        return sorted(found, key=lambda c: (c.updated, c.id), reverse=True)

    def resolve_id(self, ref: str) -> str:
        ids = self.ids()
        if ref in ids:
            return ref
        matches = [i for i in ids if i.startswith(ref)] if ref else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InputError(f"'{ref}' matches {len(matches)} conversations", hint="give more of the id")
        raise InputError(f"no saved conversation '{ref}'", hint="`gptcli chats list` shows them")

    def load(self, ref: str) -> Conversation:
        return read_conversation_file(self.path(self.resolve_id(ref)))

    def latest(self) -> Conversation:
        convs = self.list()
        if not convs:
            raise InputError("there is no saved conversation to continue", hint="start one with `gptcli chat`")
        return convs[0]

    def delete(self, ref: str) -> str:
        conv_id = self.resolve_id(ref)
        self.path(conv_id).unlink()
        return conv_id


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingConfig))


def parse_setting(key: str, value: str) -> Any:
    """A `/set` value as typed: `none` clears seed, stop is comma-separated."""
    if key not in SAMPLING_KEYS:
        import difflib

        close = difflib.get_close_matches(key, SAMPLING_KEYS, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown setting '{key}'{suggestion}", hint="settings: " + ", ".join(SAMPLING_KEYS))
    if key == "seed" and value.lower() in {"none", "null", "random"}:
        return None
    if key == "stop":
        return tuple(s for s in value.split(",") if s)
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
        for event in self.events:
            if isinstance(event, Token):
                self.text += event.text
            else:
                self.finished = event
                self.chat._record_reply(event.text, event.reason == "interrupted", event.stats)
                self.recorded = True
            yield event

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
        if conversation.sampling:
            self.settings = with_sampling(settings, **conversation.sampling)
        self.kv = KVSession(backend)
        self.last_stats: Stats | None = None
        self.prompt_tokens = 0
        self._warned_trim = False

    # -- context ---------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.backend.info.context_length)

    def reserve(self) -> int:
        """Room kept free for the reply."""
        return max(1, min(self.settings.sampling.max_tokens, self.context_length // 2))

    def encode_window(self) -> list[int]:
        if self.tokenizer.chat_template:
            rendered = self.tokenizer.render_chat(self.conversation.window())
            return self.tokenizer.encode(rendered, add_special_tokens=False)
        # Base models have no template: a plain transcript they can continue.
        lines = [self.conversation.system or ""] if self.conversation.system else []
        for m in self.conversation.window():
            if m["role"] != "system":
                lines.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}")
        return self.tokenizer.encode("\n".join([*lines, "Assistant:"]), add_special_tokens=True)

    def fit(self) -> list[int]:
        """Prompt ids for the window, dropping the oldest exchanges (never the system message) to fit."""
        conv = self.conversation
        ids = self.encode_window()
        limit = self.context_length - self.reserve()
        dropped = 0
        while len(ids) > limit:
            nxt = self._next_exchange_start(conv.window_start)
            if nxt is None:
                raise InputError(
                    f"the message needs {len(ids)} tokens with the chat template; "
                    f"the context holds {self.context_length} with {self.reserve()} kept for the reply",
                    hint="shorten it, or lower max_tokens with /set max_tokens N",
                )
            dropped += nxt - conv.window_start
            conv.window_start = nxt
            ids = self.encode_window()
        if dropped and not self._warned_trim:
            self.warn(
                "the conversation outgrew the context: the oldest exchanges are no longer sent to the model "
                "(they stay saved; /show says how many)"
            )
            self._warned_trim = True
        self.prompt_tokens = len(ids)
        return ids

    def _next_exchange_start(self, start: int) -> int | None:
        """Index of the second user message at or after `start` (so the last one is always kept)."""
        msgs = self.conversation.messages
        users = [i for i in range(start, len(msgs)) if msgs[i]["role"] == "user"]
        return users[1] if len(users) > 1 else None

    # -- turns -----------------------------------------------------------------------------------

    def say(self, text: str) -> Turn:
        """Append a user message (saved at once) and start the reply."""
        if not text.strip():
            raise InputError("the message is empty")
        self.conversation.messages.append({"role": "user", "content": text, "time": _now()})
        try:
            ids = self.fit()
        except InputError:
            self.conversation.messages.pop()
            raise
        self.save()
        return self._reply(ids)

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
            self.kv = KVSession(self.backend)
        return Turn(self, generate(self.backend, self.tokenizer, ids, self.settings.sampling, session=self.kv))

    def _record_reply(self, text: str, interrupted: bool, stats: Stats | None) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": text, "time": _now()}
        if interrupted:
            message["interrupted"] = True
            # An interrupt can land inside a forward pass and leave the cache half-written: start clean.
            self.kv = KVSession(self.backend)
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
        """Start a new conversation with the same model, system message and settings."""
        old = self.conversation
        self.conversation = Conversation(model=old.model, system=old.system, sampling=dict(old.sampling))
        self._warned_trim = False

    def load(self, conv: Conversation) -> None:
        """Continue a conversation loaded from a file, as a new saved conversation."""
        conv = replace(conv, id=new_id(), model=self.conversation.model)
        self.conversation = conv
        if conv.sampling:
            self.settings = with_sampling(self.settings, **conv.sampling)
        self._warned_trim = False
        self.save()

    def set_system(self, text: str) -> None:
        self.conversation.system = text or None
        self.save()

    def set_sampling(self, key: str, raw: str) -> Any:
        value = parse_setting(key, raw)
        self.settings = with_sampling(self.settings, **{key: value})
        stored = getattr(self.settings.sampling, key)
        self.conversation.sampling[key] = list(stored) if isinstance(stored, tuple) else stored
        self.save()
        return stored

    def save(self) -> None:
        if self.store is not None and self.conversation.messages:
            self.store.save(self.conversation)

    def budget(self) -> tuple[int, int]:
        """(tokens the window uses now, tokens left in the context)."""
        try:
            used = len(self.encode_window())
        except GptcliError:
            used = self.prompt_tokens
        return used, max(self.context_length - used, 0)


# -- slash commands (terminal-independent) ------------------------------------------------------

COMMANDS: dict[str, str] = {
    "/help": "list these commands",
    "/system TEXT": "set the system message (no TEXT: show it)",
    "/set KEY VALUE": "change a sampling setting: " + ", ".join(SAMPLING_KEYS),
    "/show": "settings, model and the token budget used/left",
    "/reset": "start a new conversation (the old one stays saved)",
    "/retry": "regenerate the last reply",
    "/undo": "drop the last exchange",
    "/save FILE": "save the conversation as Markdown (.md) or JSON (.json)",
    "/load FILE": "continue a conversation saved as JSON",
    "/stats": "timings of the last reply",
    "/exit": "leave (Ctrl-D does too)",
}


@dataclass(frozen=True)
class CommandResult:
    """What the REPL should do: print `output`, then maybe 'retry' (generate again) or 'exit'."""

    output: str = ""
    action: str | None = None


def is_command(line: str) -> bool:
    return line.startswith("/") and not line.startswith("//")


def help_text() -> str:
    width = max(len(k) for k in COMMANDS)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in COMMANDS.items())


def show_text(chat: ChatSession, backend_name: str = "") -> str:
    conv = chat.conversation
    used, left = chat.budget()
    s = chat.settings.sampling
    dropped = conv.window_start
    lines = [
        f"model              {conv.model}" + (f" ({backend_name}/{chat.backend.info.device})" if backend_name else ""),
        f"conversation       {conv.id} ({len(conv.messages)} messages)",
        f"system             {conv.system or '-'}",
        f"tokens             {used} used / {left} left of {chat.context_length} (up to {s.max_tokens} per reply)",
        "trimmed            " + (f"{dropped} oldest messages no longer sent to the model" if dropped else "none"),
    ]
    for key in SAMPLING_KEYS:
        value = getattr(s, key)
        lines.append(f"{key.ljust(18)} {', '.join(value) if isinstance(value, tuple) else value}")
    return "\n".join(lines)


def stats_text(chat: ChatSession) -> str:
    st = chat.last_stats
    if st is None:
        return "no reply yet"
    return (
        f"prompt {st.prompt_tokens} tok ({st.cached_tokens} reused from the last turn) · "
        f"TTFT {st.ttft_s * 1000:.0f} ms · prefill {st.prefill_tokens_per_s:.1f} tok/s · "
        f"{st.new_tokens} new tok · decode {st.decode_tokens_per_s:.1f} tok/s · total {st.total_s:.2f} s"
    )


def run_command(chat: ChatSession, line: str, backend_name: str = "") -> CommandResult:
    """Execute a slash command. Errors raise GptcliError; the REPL prints them and goes on."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    name = name.lower()
    if name in {"/exit", "/quit", "/bye"}:
        return CommandResult(action="exit")
    if name in {"/help", "/?"}:
        return CommandResult(help_text())
    if name == "/system":
        if not arg:
            return CommandResult(f"system: {chat.conversation.system or '-'}")
        chat.set_system(arg)
        return CommandResult("system message set")
    if name == "/set":
        key, _, value = arg.partition(" ")
        if not key or not value.strip():
            raise UsageError("usage: /set KEY VALUE", hint="settings: " + ", ".join(SAMPLING_KEYS))
        try:
            stored = chat.set_sampling(key, value.strip())
        except ConfigError as exc:  # the flag-oriented message names --flags; say it in /set terms
            raise UsageError(f"/set {key}: {exc.message.split(': ', 1)[-1]}") from None
        return CommandResult(f"{key} = {stored}")
    if name == "/show":
        return CommandResult(show_text(chat, backend_name))
    if name == "/reset":
        chat.reset()
        return CommandResult("new conversation " + chat.conversation.id)
    if name == "/retry":
        return CommandResult(action="retry")
    if name == "/undo":
        removed = chat.undo()
        return CommandResult(f"dropped the last exchange ({removed} messages)")
    if name == "/save":
        if not arg:
            raise UsageError("usage: /save FILE.md or /save FILE.json")
        path = Path(arg).expanduser()
        kind = write_conversation_file(chat.conversation, path)
        return CommandResult(f"saved {kind} to {path}")
    if name == "/load":
        if not arg:
            raise UsageError("usage: /load FILE.json")
        chat.load(read_conversation_file(Path(arg).expanduser()))
        count = len(chat.conversation.messages)
        return CommandResult(f"loaded {count} messages as conversation {chat.conversation.id}")
    if name == "/stats":
        return CommandResult(stats_text(chat))
    raise UsageError(f"unknown command {name}", hint="/help lists the commands")


def collect_message(first: str, more: Callable[[], str | None]) -> str:
    '''A message as typed: one line, or `"""` … `"""` spanning lines (`more()` gives the next, None at EOF).'''
    if not first.lstrip().startswith('"""'):
        return first
    body = first.lstrip()[3:]
    if body.rstrip().endswith('"""'):
        return body.rstrip()[:-3]
    lines = [body] if body else []
    while (line := more()) is not None:
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            break
        lines.append(line)
    return "\n".join(lines).strip("\n")
