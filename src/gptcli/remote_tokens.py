"""Token counts for a model on a server: its own tokenizer over HTTP where it offers one, else an estimate.

gptcli serve, vLLM and llama.cpp's llama-server expose the served model's tokenizer at the server's root,
beside /v1: `POST /tokenize` and `POST /detokenize`. gptcli and vLLM read `{"prompt",
"add_special_tokens"}`; llama-server reads `{"content", "add_special"}` and answers a `prompt` with no
tokens, which is how the probe tells them apart. A server without them (ollama, api.openai.com) leaves the
estimate: 4 characters a token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from gptcli.errors import GptcliError, ModelError, RemoteError
from gptcli.textio import text_pieces

CHARS_PER_TOKEN = 4
PIECE_CHARS = 100_000  # text per /tokenize request: far below a server's body limit, even JSON-escaped
CACHED_TEXTS = 512  # a chat counts every message of its window on every turn: ask once per message
CACHED_CHARS = 16_384  # longer texts (a document to summarize) are counted once anyway
PROBE_TEXT = "Hello world"


class EstimatedTokenizer:
    """A served model's tokenizer when it is not here: 4 characters a token (English; code takes more)."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]

    def decode(self, pieces: Sequence[str]) -> str:
        return "".join(pieces)


class TokenServer(Protocol):
    """What a ServedTokenizer needs of `gptcli.remote.RemoteModel`."""

    root_url: str

    @property
    def model(self) -> str: ...

    def post_json(self, path: str, payload: dict[str, Any], *, at_root: bool = False) -> Any: ...


class ServedTokenizer:
    """The served model's own tokenizer, asked over HTTP; `probe` finds out whether (and how) a server offers it."""

    chat_template = None

    def __init__(self, server: TokenServer, field: str) -> None:
        self.server = server
        self.field = field  # "prompt" (gptcli serve, vLLM) or "content" (llama-server)
        self._counted: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()

    @classmethod
    def probe(cls, server: TokenServer) -> ServedTokenizer | None:
        """The tokenizer in the first request shape the server answers with tokens; None if it has neither."""
        for field in ("prompt", "content"):
            tokenizer = cls(server, field)
            try:
                if tokenizer._tokenize(PROBE_TEXT, add_special_tokens=False):
                    return tokenizer
            except ModelError:  # it does not serve this model (-m): that, not "no /tokenize", is the error
                raise
            except GptcliError:
                continue  # 404 (no such route), 400/422 (not this shape), a body that is not token ids
        return None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        key = (text, add_special_tokens)
        if key in self._counted:
            self._counted.move_to_end(key)
            return list(self._counted[key])
        ids: list[int] = []
        for index, piece in enumerate(text_pieces(text, PIECE_CHARS)):
            ids += self._tokenize(piece, add_special_tokens=add_special_tokens and index == 0)
        if len(text) <= CACHED_CHARS:
            self._counted[key] = list(ids)
            if len(self._counted) > CACHED_TEXTS:
                self._counted.popitem(last=False)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        data = self.server.post_json("/detokenize", {"model": self.server.model, "tokens": list(ids)}, at_root=True)
        text = data.get("prompt", data.get("content")) if isinstance(data, dict) else None  # vLLM's, llama.cpp's
        if not isinstance(text, str):
            raise RemoteError(f"{self.server.root_url}/detokenize did not answer with text")
        return text

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        special = "add_special_tokens" if self.field == "prompt" else "add_special"
        payload = {"model": self.server.model, self.field: text, special: add_special_tokens}
        data = self.server.post_json("/tokenize", payload, at_root=True)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise RemoteError(f"{self.server.root_url}/tokenize did not answer with token ids")
        return tokens
