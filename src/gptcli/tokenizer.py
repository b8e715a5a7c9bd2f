"""A light tokenizer over a model folder: `tokenizers` for the ids, jinja2 for the chat template.

It deliberately avoids importing transformers so that every backend (the ONNX one included) starts
fast, and renders chat templates the way transformers does (sandboxed jinja2, trim/lstrip blocks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gptcli.errors import ConfigError, GptcliError, InputError, ModelError
from gptcli.paths import read_source
from gptcli.template_sandbox import TemplateTooCostly, render_bounded, template_environment
from gptcli.textio import (
    CONFIG_FILE,
    MiB,
    human_bytes,
    lone_surrogate,
    one_line,
    read_json_file,
    read_text_file,
)

MAX_TOKENIZER_BYTES = 64 * MiB  # tokenizer.json and its config: Gemma 3's 262k vocabulary is 33 MB
BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte tokens (Llama 2, Mistral)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character → byte: printable bytes stand for themselves, the others
    for the characters from U+0100 on (a token piece such as 'ðŁĺ' is the bytes F0 9F 98)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {chr(byte): byte for byte in printable}
    table.update({chr(256 + n): byte for n, byte in enumerate(others)})
    return table


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _read_json_object(path: Path) -> dict[str, Any]:
    """One of the folder's JSON files; a corrupt one is a ModelError naming it (hf.read_config is the twin)."""
    try:
        data = read_json_file(path, MAX_TOKENIZER_BYTES)
    except (OSError, ValueError) as exc:
        raise ModelError(f"corrupt {path}: {exc}", hint="re-download or replace the file") from None
    if not isinstance(data, dict):
        raise ModelError(f"corrupt {path}: not a JSON object", hint="re-download or replace the file")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template the user gave (`--chat-template FILE`), rendered in place of the model's own."""

    text: str
    path: Path


def read_chat_template(path: Path) -> ChatTemplate:
    """A chat template file, read (bounded) and compiled in the sandbox templates render in, before any model
    loads: a file that cannot be read, or is not Jinja, is a one-line ConfigError naming it (and the line)."""
    from jinja2 import TemplateSyntaxError

    try:
        text = read_text_file(path, CONFIG_FILE)
    except InputError as exc:  # not found, a folder, binary, not UTF-8, too big: a setting that cannot be used
        raise ConfigError(f"chat template: {exc.message}", hint=exc.hint) from None
    if not text.strip():
        raise ConfigError(f"chat template {path} is empty", hint="give a Jinja chat template file")
    try:
        template_environment(path).from_string(text)
    except TemplateSyntaxError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: not a valid chat template: {one_line(exc.message or 'syntax error')}",
            hint="fix the Jinja syntax on that line",
        ) from None
    return ChatTemplate(text, path)


def template_origin(folder: Path, given: str | None = None) -> str | None:
    """Where a model's chats get their template, as `models info` says it: the given file (--chat-template), the
    model's own file, or None (a plain transcript). Read from the files alone, without loading the tokenizer."""
    if given:
        return given
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja")
    config = folder / "tokenizer_config.json"
    if config.is_file() and _read_json_object(config).get("chat_template"):
        return str(config)
    return None


# The tokens llama.cpp ends a reply at besides a GGUF's own EOS, known by their text (its vocabulary's
# end-of-generation rule). A GGUF names one EOS (Gemma 3's is <eos>, while its turns end with <end_of_turn>), so a
# model converted from one stops where llama.cpp stops on the same file.
END_OF_GENERATION = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<end_of_utterance>",
)


def _converted_from_gguf(folder: Path) -> bool:
    """Whether gptcli's cache made `folder` from a GGUF (its source record names a .gguf file)."""
    return (read_source(folder) or "").lower().endswith(".gguf")


class Tokenizer:
    """Encode/decode text for one model folder, plus its chat template (the model's own, or `chat_template`,
    the user's in its place) and end-of-sequence ids."""

    def __init__(self, folder: Path, chat_template: ChatTemplate | None = None) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self.folder = folder
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():
            if tokenizer_file.stat().st_size > MAX_TOKENIZER_BYTES:
                limit = human_bytes(MAX_TOKENIZER_BYTES)
                raise ModelError(
                    f"corrupt {tokenizer_file}: over {limit}, far more than a tokenizer holds",
                    hint="re-download or replace the file",
                )
            try:
                self._tok = FastTokenizer.from_file(str(tokenizer_file))
            except Exception as exc:  # the Rust side raises a bare Exception for any parse error
                raise ModelError(f"corrupt {tokenizer_file}: {exc}", hint="re-download or replace the file") from None
        else:
            self._tok = self._convert_slow(folder)
        cfg_path = folder / "tokenizer_config.json"
        self._config: dict[str, Any] = _read_json_object(cfg_path) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self._config.get("bos_token"))
        self.eos_token = _token_text(self._config.get("eos_token"))
        self.chat_template = self._find_chat_template(chat_template)
        self.eos_ids = self._find_eos_ids()

    @staticmethod
    def _convert_slow(folder: Path) -> Any:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(folder).backend_tokenizer
        except Exception as exc:
            raise ModelError(f"{folder}: no usable tokenizer ({exc})", hint="add a tokenizer.json") from None

    def _find_chat_template(self, given: ChatTemplate | None) -> str | None:
        if given is not None:
            self.chat_template_file = given.path
            return given.text
        jinja = self.folder / "chat_template.jinja"
        self.chat_template_file = jinja  # where the template comes from, for error messages
        if jinja.is_file():
            try:
                return jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelError(f"unreadable {jinja}: {exc}", hint="re-download or replace the file") from None
        self.chat_template_file = self.folder / "tokenizer_config.json"
        template = self._config.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template or None

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = self.folder / name
            if path.is_file():
                value = _read_json_object(path).get("eos_token_id")
                if isinstance(value, int):
                    ids.add(value)
                elif isinstance(value, list):
                    ids.update(v for v in value if isinstance(v, int))
        if self.eos_token is not None:
            token_id = self._tok.token_to_id(self.eos_token)
            if token_id is not None:
                ids.add(token_id)
        if _converted_from_gguf(self.folder):  # as llama.cpp reads the same file: its end-of-generation tokens
            ids.update(i for text in END_OF_GENERATION if (i := self._tok.token_to_id(text)) is not None)
        return frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids; text that holds a lone surrogate (no text at all: see textio) is an InputError."""
        if (char := lone_surrogate(text)) is not None:
            raise InputError(
                f"the text holds {char}, a lone surrogate that is not text",
                hint="it comes from a \\ud800-style JSON escape or bytes that are not UTF-8: fix the input",
            )
        # encode_batch lets go of the GIL while it works (encode holds it: a 1 MB text stalled the server's
        # engine thread and every stream for a second); the same ids.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def token_starts(self, text: str, ids: Sequence[int]) -> list[int] | None:
        """Where each of `ids` starts in `text` (a character index), when they are what `text` encodes to (with
        special tokens); None when they are not. A token the tokenizer adds (a BOS) starts at 0."""
        encoding = self._tok.encode_batch([text], add_special_tokens=True)[0]
        return [start for start, _ in encoding.offsets] if encoding.ids == list(ids) else None

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as OpenAI's logprobs `bytes` list them: its text's UTF-8, or, for a
        piece of a character (an emoji is often three tokens, each decoding alone to U+FFFD), that piece's bytes."""
        text = self.decode([token_id], skip_special_tokens=False)
        piece = self._tok.id_to_token(token_id) if "\ufffd" in text else None
        if piece is None:
            return text.encode("utf-8")
        if match := BYTE_FALLBACK_PIECE.fullmatch(piece):
            return bytes([int(match[1], 16)])
        if all(char in BYTE_LEVEL_ALPHABET for char in piece):
            return bytes(BYTE_LEVEL_ALPHABET[char] for char in piece)
        return text.encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (what grammar libraries build their token tables from)."""
        return self._tok.to_str()

    @cached_property
    def supports_tools(self) -> bool:
        """Whether the chat template reads `tools`, so it writes tool definitions, calls and results itself."""
        if not self.chat_template:
            return False
        from jinja2 import TemplateSyntaxError, meta

        try:
            return "tools" in meta.find_undeclared_variables(self._environment.parse(self.chat_template))
        except TemplateSyntaxError:  # rendering it says what is wrong
            return False

    @cached_property
    def _compiled_template(self) -> Any:
        return self._environment.from_string(self.chat_template or "")

    @cached_property
    def _environment(self) -> Any:
        return template_environment(self.chat_template_file)

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template applied to messages (and `tools`, OpenAI's definitions, for a template that
        reads them), as text (tokenize with add_special_tokens=False)."""
        if not self.chat_template:
            raise ModelError("this model has no chat template", hint="use --raw for plain completion")
        special = {k: _token_text(v) for k, v in self._config.items() if k.endswith("_token")}
        extra = {k: v for k, v in special.items() if v is not None}
        try:  # `tools` always given, None without tools, as transformers renders it: `tools is not none` reads so
            return render_bounded(
                self._compiled_template,
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **extra,
                tools=tools,
            )
        except GptcliError:
            raise
        except TemplateTooCostly as exc:  # the messages are what vary: the template, or what it was given
            raise InputError(
                f"{self.chat_template_file}: the chat template stopped: {exc}",
                hint="check the template (and the messages it was given: their size)",
            ) from None
        except Exception as exc:  # syntax, sandbox (SecurityError), undefined names, or Python errors inside it
            raise ModelError(
                f"{self.chat_template_file}: the chat template fails: {type(exc).__name__}: {exc}",
                hint="fix the template, or use --raw for plain completion",
            ) from None
