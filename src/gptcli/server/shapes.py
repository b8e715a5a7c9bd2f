"""How a response is written: a choice as chat (message/delta) or text completion, in OpenAI's shapes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptcli.decoding import Finished, IncrementalDetokenizer, Stats
from gptcli.sampling import TokenLogprob
from gptcli.tokenizer import Tokenizer


@dataclass
class Shape:
    """How one choice of a response is written: chat (message/delta) or text completion, with the response's
    id and model. A completions request with several prompts has one choice, and one Shape, per prompt.

    Logprobs, when asked for, come in each kind's own OpenAI format: chat's `content` list of
    {token, logprob, bytes, top_logprobs}, the legacy completion's parallel lists (tokens,
    token_logprobs, top_logprobs, text_offset). A token is named by its text after the token before it, as the
    reply's text reads it (a sentencepiece decoder strips a text's first space: "▁42" alone is "42")."""

    kind: str
    model: str
    echo: str = ""
    tokenizer: Tokenizer | None = None
    prompt_ids: list[int] = field(default_factory=list)  # the echoed prompt's tokens (its logprobs)
    index: int = 0  # the choice's index
    response_id: str = ""  # shared by a response's choices (made here when empty)
    created: int = 0
    constraint_param: str = "response_format"  # the field that set the reply's grammar (its errors name it)
    context: list[int] = field(default_factory=list)  # the prompt's tokens when the reply continues its text

    def __post_init__(self) -> None:
        if not self.response_id:
            self.response_id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
            self.created = int(time.time())
        self._text_offset = len(self.echo)  # where the next token's text starts (legacy text_offset)
        self._text: IncrementalDetokenizer | None = None  # the reply's text as the decoder writes it
        self._context: list[int] = self.context  # what that text follows (the echoed prompt's tokens: nothing)
        self._previous: int | None = self.context[-1] if self.context else None  # the token before the next one

    def envelope(self, chunk: bool) -> dict[str, Any]:
        obj = "text_completion" if self.kind == "text" else ("chat.completion.chunk" if chunk else "chat.completion")
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}

    def chunk(
        self,
        *,
        text: str | None = None,
        finish: str | None = None,
        role: bool = False,
        logprobs: list[tuple[int, TokenLogprob]] | None = None,
    ) -> dict[str, Any]:
        scored = self.logprobs(logprobs) if logprobs else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": self.index, "delta": delta, "logprobs": scored, "finish_reason": finish}
        else:
            choice = {"index": self.index, "text": text or "", "logprobs": scored, "finish_reason": finish}
        return {**self.envelope(True), "choices": [choice]}

    def text_chunks(self, text: str, logprobs: list[tuple[int, TokenLogprob]]) -> list[dict[str, Any]]:
        """The chunks that stream the reply's next text (with its tokens' logprobs); none: held back, and
        the logprobs wait for the next chunk."""
        return [self.chunk(text=text, logprobs=logprobs)]

    def finish_chunks(self, finish: str, logprobs: list[tuple[int, TokenLogprob]]) -> list[dict[str, Any]]:
        """The chunks that end the streamed choice: logprobs still unsent, then the finish reason."""
        return [*([self.chunk(text="", logprobs=logprobs)] if logprobs else []), self.chunk(finish=finish)]

    def logprobs(self, tokens: list[tuple[int, TokenLogprob | None]]) -> dict[str, Any]:
        """The `logprobs` object of a choice for these (token id, logprob) pairs, in this kind's format
        (None: the prompt's first token, which has no logprob)."""
        afters = [self._previous, *(token for token, _ in tokens[:-1])][: len(tokens)]  # none for no tokens
        self._previous = tokens[-1][0] if tokens else self._previous
        if self.kind == "chat":
            content = [
                {
                    **self._named(token, scored.logprob, after),
                    "top_logprobs": [self._named(other, value, after) for other, value in scored.top],
                }
                for (token, scored), after in zip(tokens, afters, strict=True)
                if scored is not None
            ]
            return {"content": content, "refusal": None}
        names = [self._token_text(token, after) for (token, _), after in zip(tokens, afters, strict=True)]
        offsets = []
        self._text = self._text or IncrementalDetokenizer(self.tokenizer, self._context)  # type: ignore[arg-type]
        for token, name in zip((token for token, _ in tokens), names, strict=True):
            # Offsets index the returned text: the pieces of a split character all point at its start.
            written = len(self._text.add(token))
            offsets.append(max(self._text_offset, self._text_offset + written - len(name)))
            self._text_offset += written
        tops: list[dict[str, float] | None] = []
        for (_, scored), name, after in zip(tokens, names, afters, strict=True):
            if scored is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for other, value in scored.top:  # tokens that read the same (byte pieces): the likelier one stays
                top.setdefault(self._token_text(other, after), value)
            top.setdefault(name, scored.logprob)  # the chosen token is always listed, as OpenAI does
            tops.append(top)
        return {
            "tokens": names,
            "token_logprobs": [None if scored is None else scored.logprob for _, scored in tokens],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _echoed_logprobs(
        self, prompt_logprobs: tuple[TokenLogprob | None, ...], reply: list[tuple[int, TokenLogprob | None]]
    ) -> dict[str, Any]:
        """Completions' logprobs of the echoed prompt's tokens, then the reply's. Offsets index the returned text:
        the prompt's its tokens' places in the prompt as sent (its decoded text can read otherwise: a special
        token's text a decoder skips, a space it strips), the reply's from the prompt's end."""
        assert self.tokenizer is not None, "logprobs need the tokenizer"
        context, previous = self._context, self._previous
        self._text_offset, self._text, self._context, self._previous = 0, None, [], None
        prompt = self.logprobs(list(zip(self.prompt_ids, prompt_logprobs, strict=True)))
        starts = self.tokenizer.token_starts(self.echo, self.prompt_ids)  # None: a prompt of token ids
        prompt["text_offset"] = prompt["text_offset"] if starts is None else starts
        self._text_offset, self._text, self._context, self._previous = len(self.echo), None, context, previous
        scored = self.logprobs(reply)
        return {key: prompt[key] + scored[key] for key in prompt}

    def _named(self, token: int, logprob: float, after: int | None) -> dict[str, Any]:
        assert self.tokenizer is not None, "logprobs need the tokenizer"
        name = self._token_text(token, after)
        # A piece of a character: its own bytes, not U+FFFD's.
        data = list(self.tokenizer.token_bytes(token) if "\ufffd" in name else name.encode())
        return {"token": name, "logprob": logprob, "bytes": data}

    def _token_text(self, token: int, after: int | None = None) -> str:
        """The token's text after the token `after` (None: where a text starts), or alone where it adds no
        whole characters to it (a piece of a character, a special token)."""
        assert self.tokenizer is not None, "logprobs need the tokenizer"
        alone = self.tokenizer.decode([token], skip_special_tokens=False)
        if after is None or "\ufffd" in alone:
            return alone
        head = self.tokenizer.decode([after])
        both = self.tokenizer.decode([after, token])
        if not head or "\ufffd" in both or len(both) <= len(head) or not both.startswith(head):
            return alone
        return both[len(head) :]

    def usage_chunk(self, stats: list[Stats]) -> dict[str, Any]:
        return {**self.envelope(True), "choices": [], "usage": usage(stats)}

    def choice(self, finished: Finished, finish: str, *, with_logprobs: bool = False) -> dict[str, Any]:
        """The whole (not streamed) choice."""
        text = self.echo + finished.text
        scored = None
        if with_logprobs:
            tokens: list[tuple[int, TokenLogprob | None]] = [*zip(finished.token_ids, finished.logprobs, strict=True)]
            if finished.prompt_logprobs:  # echo: the prompt's tokens come first
                scored = self._echoed_logprobs(finished.prompt_logprobs, tokens)
            else:
                scored = self.logprobs(tokens)
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            return {"index": self.index, "message": message, "logprobs": scored, "finish_reason": finish}
        return {"index": self.index, "text": text, "logprobs": scored, "finish_reason": finish}


def usage(stats: list[Stats]) -> dict[str, Any]:
    """A response's usage: the sums over its choices."""
    prompt = sum(s.prompt_tokens for s in stats)
    completion = sum(s.new_tokens for s in stats)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in stats)},
    }
