"""A saved conversation: its data, its Markdown/JSON files, and the store of one file per chat."""

from __future__ import annotations

import json
import re
import secrets
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gptcli.atomicio import remove_abandoned_writes, write_atomic
from gptcli.chat.file_fields import checked_chat_template, checked_sampling, output_from_json, output_to_json
from gptcli.config import OutputConstraint
from gptcli.errors import GptcliError, InputError, UsageError
from gptcli.locks import short_lock
from gptcli.paths import data_dir
from gptcli.textio import CHAT_FILE, CHAT_MESSAGE, human_bytes, lone_surrogate, over_limit, read_text_file

FORMAT_VERSION = 1
SAVE_ID_PEEK = 64 * 1024  # bytes of a file read to tell an earlier /save of a conversation (its id is near the top)
# A JSON escape that may stand for a lone surrogate (valid JSON, but no text: it cannot be saved as UTF-8).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
ROLES = ("user", "assistant", "system")  # a chat file's roles (a system message is lifted out of the list)


class ChatFileError(InputError):
    """A conversation the store could not read back if it wrote it (over the chat-file limit, or not
    text): nothing is written."""


def not_text(where: str, char: str) -> InputError:
    """The error for a lone surrogate `char` ("U+D800", from a JSON "\\ud800" escape: see
    textio.lone_surrogate), which no UTF-8 file can hold."""
    return InputError(
        f"{where} holds {char}, a lone surrogate that is not text",
        hint=f"remove or fix the \\u{char[2:].lower()} escape in the file",
    )


def chats_dir() -> Path:
    return data_dir() / "chats"


def now(at: float | None = None) -> str:
    """A conversation's time stamp: now, or the given epoch seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(at))


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
    output: OutputConstraint | None = None  # the structured output replies follow (None: free text)
    chat_template: str | None = None  # the --chat-template file its prompts were rendered with (None: the model's)
    created: str = field(default_factory=now)
    updated: str = field(default_factory=now)

    @property
    def title(self) -> str:
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        line = " ".join(first.split())
        return line[:60] + ("…" if len(line) > 60 else "")

    def window(self, start: int | None = None) -> list[dict[str, str]]:
        """The messages the model sees: the system message, then the untrimmed history (from `start`)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        first = self.window_start if start is None else start
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages[first:]]

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
            **({"output": output_to_json(self.output)} if self.output is not None else {}),
            **({"chat_template": self.chat_template} if self.chat_template else {}),
            "messages": self.messages,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str, *, default_time: str | None = None) -> Conversation:
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise InputError(f"{where} is not a saved gptcli conversation", hint="it needs a 'messages' list")
        messages = []
        for number, m in enumerate(data["messages"], 1):
            if not isinstance(m, dict):
                raise InputError(f"{where}: message {number} must be an object with a role and its content")
            if m.get("role") not in ROLES:  # not a set: a role that is a list or an object is no key
                got = f"got {json.dumps(m['role'], ensure_ascii=False)[:40]}" if "role" in m else "it has none"
                raise InputError(
                    f"{where}: message {number}: its role must be user, assistant or system, {got}",
                    hint="fix or remove that message in the file",
                )
            content = m.get("content") or ""
            if not isinstance(content, str):
                raise InputError(f"{where}: message {number}: its content must be text")
            if (char := lone_surrogate(content)) is not None:
                raise not_text(f"{where}: message {number}", char)
            if len(content.encode("utf-8")) > CHAT_MESSAGE.max_bytes:
                raise over_limit(f"{where}: message {number}", CHAT_MESSAGE)
            if m["role"] == "system":  # a plain OpenAI-style list: lift the system message out
                data = {**data, "system": content}
                continue
            messages.append({**m, "content": content})
        system, window_start = data.get("system"), data.get("window_start") or 0
        if system is not None and not isinstance(system, str):
            raise InputError(f"{where}: 'system' must be text")
        if (
            not isinstance(window_start, int)
            or isinstance(window_start, bool)
            or not 0 <= window_start <= len(messages)
        ):
            raise InputError(f"{where}: 'window_start' must be a message number from 0 to {len(messages)}")
        conv = cls(
            id=str(data.get("id") or new_id()),
            model=str(data.get("model") or ""),
            system=system,
            messages=messages,
            sampling=checked_sampling(data.get("sampling"), where),
            window_start=window_start,
            output=output_from_json(data.get("output"), where),
            chat_template=checked_chat_template(data.get("chat_template"), where),
        )
        conv.created = _time_stamp(data, "created", where) or default_time or conv.created
        conv.updated = _time_stamp(data, "updated", where) or default_time or conv.updated
        return conv


def _time_stamp(data: dict[str, Any], key: str, where: str) -> str | None:
    """A chat file's `created` or `updated`: an ISO 8601 time stamp, or None when it has none. Anything else
    (a number, an object, 'yesterday') is refused: `chats list` sorts by it and `--continue` takes the first."""
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value)
            return value
        except ValueError:
            pass
    raise InputError(
        f"{where}: '{key}' must be a time stamp such as {now()}, got {json.dumps(value, ensure_ascii=False)[:40]}",
        hint=f"fix or remove '{key}' in the file",
    )


def sort_time(stamp: str) -> float:
    """A conversation's time stamp as seconds since the epoch, to sort by (one without a zone is local time)."""
    return datetime.fromisoformat(stamp).timestamp()


def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title or 'Conversation'}", "", f"*{conv.id} · {conv.model} · {conv.created}*", ""]
    if conv.system:
        lines += ["**System:** " + conv.system, ""]
    for m in conv.messages:
        who = "You" if m["role"] == "user" else "Assistant"
        mark = " *(interrupted)*" if m.get("interrupted") else ""
        lines += [f"### {who}{mark}", "", m["content"], ""]
    return "\n".join(lines).rstrip() + "\n"


def read_conversation_file(path: Path, *, default_time: str | None = None) -> Conversation:
    """Load a conversation saved as JSON (by /save, `chats export` or the store); `default_time` dates
    one whose file says nothing of its times. A lone surrogate anywhere in it is refused: it could not be saved."""
    if path.is_dir():
        raise InputError(
            f"{path} is a folder: /load needs a conversation file", hint="give a .json file saved with /save FILE.json"
        )
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: only JSON conversations can be loaded", hint="save with /save FILE.json")
    text = read_text_file(path, CHAT_FILE)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if isinstance(data, list):
        data = {"messages": data}
    conv = Conversation.from_dict(data, str(path), default_time=default_time)
    # The messages' contents are checked already; an escape in the file may hide one in the rest.
    if SURROGATE_ESCAPE.search(text) and (char := lone_surrogate(json.dumps(conv.to_dict(), ensure_ascii=False))):
        raise not_text(str(path), char)
    return conv


def conversation_json(conv: Conversation) -> bytes:
    """`conv` as the store writes it: indented JSON, or compact where indented would pass the chat-file limit."""
    data = conv.to_dict()
    try:
        payload = json.dumps(data, ensure_ascii=False, indent=2).encode("utf-8") + b"\n"
        if len(payload) > CHAT_FILE.max_bytes:
            payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    except UnicodeEncodeError as exc:
        error = not_text("the conversation", f"U+{ord(exc.object[exc.start]):04X}")  # utf-8 fails only there
        raise ChatFileError(error.message, hint=error.hint) from None
    return payload


def write_conversation_file(conv: Conversation, path: Path) -> str:
    """Save as Markdown (.md) or JSON (.json); returns the format used."""
    suffix = path.suffix.lower()
    if suffix in {".md", ".markdown"}:
        write_atomic(path, to_markdown(conv), mode=0o600)
        return "markdown"
    if suffix == ".json":  # a copy, even of a chat too long for the store (/load will say so)
        write_atomic(path, conversation_json(conv), mode=0o600)
        return "json"
    raise UsageError(f"cannot tell the format of {path.name}", hint="name it .md (Markdown) or .json")


def is_save_of(path: Path, conv: Conversation) -> bool:
    """Whether the file at `path` is an earlier /save of `conv`: both formats name its id near the top."""
    try:
        with path.open("rb") as file:
            head = file.read(SAVE_ID_PEEK)
    except OSError:
        return False
    return conv.id.encode("utf-8") in head


class ConversationStore:
    """One JSON file per conversation in the gptcli data folder (mode 0600, written atomically)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or chats_dir()
        self.skipped: list[str] = []  # why files were left out of the last list()
        self.seen: dict[str, tuple[int, int, int] | None] = {}  # each file as this store last read or wrote it

    def path(self, conv_id: str) -> Path:
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        """Write `conv`; one the store could not read back is a ChatFileError, and nothing is written.

        When its file changed since this store last read or wrote it (another `gptcli chat` on the same
        conversation), that file is left as it is and `conv` is saved on under a new id: nothing is lost."""
        conv.updated = now()
        payload = conversation_json(conv)
        if len(payload) > CHAT_FILE.max_bytes:
            raise ChatFileError(
                f"as saved, the conversation would be {human_bytes(len(payload))}: "
                f"over the {CHAT_FILE.label} limit for {CHAT_FILE.kind}",
                hint="/reset starts a new conversation (this one stays saved as it was)",
            )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._held():  # the check and the write as one: another chat's save could come between them
            if conv.id in self.seen and _stamp(self.path(conv.id)) not in {self.seen[conv.id], None}:
                conv.id = _unused_id(self.root)
                payload = conversation_json(conv)
            path = self.path(conv.id)
            write_atomic(path, payload, mode=0o600)
            self.seen[conv.id] = _stamp(path)
        return path

    def discard(self, conv_id: str) -> None:
        """Remove a conversation's file, unless another chat changed it since this store read or wrote it."""
        path = self.path(conv_id)
        with self._held():
            if self.seen.get(conv_id, _stamp(path)) == _stamp(path):
                path.unlink(missing_ok=True)

    def _held(self) -> AbstractContextManager[None]:
        """The store's folder, held by one gptcli process's save (or discard) at a time."""
        return short_lock(self.root)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            if self.root.exists():  # a file where the folder goes is not "no chats yet": none could be saved
                raise GptcliError(f"{self.root} is not a folder", hint="move it aside: gptcli keeps saved chats there")
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))

    def list(self) -> list[Conversation]:
        """Every saved conversation, most recently updated first (unreadable files are skipped)."""
        found = []
        self.skipped = []
        remove_abandoned_writes(self.root)  # a save killed (-9) before its rename
        for conv_id in self.ids():
            try:
                found.append(self._read(conv_id))
            except GptcliError as exc:
                self.skipped.append(exc.message)
        return sorted(found, key=lambda c: (sort_time(c.updated), c.id), reverse=True)

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
        return self._read(self.resolve_id(ref))

    def _read(self, conv_id: str) -> Conversation:
        """A stored conversation's id is its file's name, and a file without times (a JSON list copied
        in by hand) dates from its last change: never a new id, nor "now", on every read."""
        path = self._chat_file(conv_id)
        try:
            changed = now(path.stat().st_mtime)
        except OSError:
            changed = None  # read_conversation_file reports the missing or unreadable file
        stamp = _stamp(path)
        conv = read_conversation_file(path, default_time=changed)
        conv.id = conv_id
        self.seen[conv_id] = stamp
        return conv

    def latest(self) -> Conversation:
        convs = self.list()
        if not convs:
            raise InputError("there is no saved conversation to continue", hint="start one with `gptcli chat`")
        return convs[0]

    def delete(self, ref: str) -> str:
        conv_id = self.resolve_id(ref)
        self._chat_file(conv_id).unlink()
        return conv_id

    def _chat_file(self, conv_id: str) -> Path:
        """The path of a stored chat; a folder or a FIFO by that name is not one (an InputError)."""
        path = self.path(conv_id)
        if path.exists() and not path.is_file():  # a FIFO would block the read; a folder is not a chat either
            kind = "a folder" if path.is_dir() else "a pipe or a device"
            raise InputError(f"{path} is {kind}, not a saved chat", hint="move it out of the chats folder")
        return path


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from another (an atomic write makes a new inode); None: no file."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _unused_id(root: Path) -> str:
    """A new conversation id no file in `root` has (one made in the same second could)."""
    while (root / f"{(conv_id := new_id())}.json").exists():
        pass
    return conv_id
