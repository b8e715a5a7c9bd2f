"""Turn messages into prompt token ids (chat template or plain text), and what to do when they are too long."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gptcli.config import SamplingConfig
from gptcli.errors import FieldError, InputError
from gptcli.textio import PIECE_CHARS, text_pieces
from gptcli.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    templated: bool
    warning: str | None = None
    continues: bool = False  # the reply continues this text (SamplingConfig.continues_prompt), not a new turn


Messages = list[dict[str, Any]]  # role and content; tool calls and results (gptcli.tools) add keys
# The roles a message may have (OpenAI's): batch files and the server take the same ones.
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def template_role(role: str) -> str:
    """The role a chat template is given: OpenAI's `developer` message is a system message (no template
    knows the newer name), for batch files and the server alike."""
    return "system" if role == "developer" else role


def messages_for(text: str, system: str | None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def user_text(messages: Messages) -> str:
    """Without a chat template, `generate` sends the user's text alone (the system message is dropped)."""
    return messages[-1]["content"]


# How a chat's prompt ends: the model's new turn (the template's generation prompt), the last message (the
# assistant's) left open for the reply to continue (llama-server's assistant prefill, vLLM's
# continue_final_message), or the messages alone (vLLM's add_generation_prompt: false).
NEW_TURN, CONTINUE, BARE = "new turn", "continue", "bare"
PREFILL_FIELDS = ("continue_final_message", "add_generation_prompt")  # vLLM's request fields that choose it


def joined_parts(texts: list[str]) -> str:
    """A message's text parts as one text, a line each, as vLLM joins them: a "Context: ..." part and a
    "Question: ..." part (LangChain's and RAG chains' way) must not run together. The server's and batch
    files' one rule."""
    return "\n".join(texts)


def transcript(messages: Messages, ending: str = NEW_TURN) -> str:
    """Without a chat template, a chat is a plain transcript the base model can continue: after a last
    "Assistant:" for a new turn, else after the last message (an assistant's continues its own line)."""
    lines = [m["content"] if m["role"] == "system" else _turn(m["role"], m["content"]) for m in messages]
    return "\n".join([*lines, "Assistant:"] if ending == NEW_TURN else lines)


def _turn(role: str, content: str) -> str:
    """One line of the transcript, "Role: content". A reply the model wrote after "Assistant:" keeps the space
    it wrote (" Hi"), so the next turn's prompt reads on from this one's, text and tokens, and no turn adds a
    space the model then copies (replies began with 1, 2, 3 spaces, turn after turn)."""
    return f"{role.title()}:{'' if content[:1].isspace() else ' '}{content}"


def prompt_ending(fields: Mapping[str, Any], messages: Messages, *, tools: bool = False) -> str:
    """How a request's chat prompt ends, from its PREFILL_FIELDS (the server's and batch lines' one rule).

    A last message from the assistant (text, no tool calls) is continued unless continue_final_message is
    false or add_generation_prompt true (llama-server continues it always; vLLM when asked). A reply that may
    call tools is JSON of its own: it starts a new turn. add_generation_prompt: false ends the prompt after
    the messages, as vLLM renders it. FieldError names the field that does not fit."""
    carry_on, new_turn = (fields.get(name) for name in PREFILL_FIELDS)
    for name, value in zip(PREFILL_FIELDS, (carry_on, new_turn), strict=True):
        if value is not None and not isinstance(value, bool):
            raise FieldError(f"{name}: must be true or false", name)
    last = messages[-1] if messages else {}
    open_reply = last.get("role") == "assistant" and not last.get("tool_calls")
    if carry_on:
        why = ""
        if new_turn:
            why = "does not go with add_generation_prompt: true (a new turn); send add_generation_prompt: false"
        elif not open_reply:
            why = "the last message must be the assistant's text to continue (this one is "
            why += "its tool calls)" if last.get("role") == "assistant" else f"the {last.get('role')}'s)"
        elif tools:
            why = "does not go with tools: a reply that may call tools is JSON, not the rest of a text"
        if why:
            raise FieldError(f"continue_final_message: {why}", "continue_final_message")
        return CONTINUE
    if carry_on is None and new_turn is not True and open_reply and not tools:
        return CONTINUE
    return BARE if new_turn is False else NEW_TURN


# Where a base model continuing a transcript starts the user's next turn: its reply ends there (it went on
# to write "User: ..." and answer itself).
TRANSCRIPT_STOP = "\nUser:"


def transcript_sampling(sampling: SamplingConfig, tokenizer: Tokenizer) -> SamplingConfig:
    """A chat's sampling: with no chat template (a transcript), the reply also stops at TRANSCRIPT_STOP."""
    if tokenizer.chat_template or TRANSCRIPT_STOP in sampling.stop:
        return sampling
    return replace(sampling, stop=(*sampling.stop, TRANSCRIPT_STOP))


def build_prompt(
    tokenizer: Tokenizer,
    messages: Messages,
    *,
    raw: bool = False,
    plain: Callable[[Messages], str] = user_text,
    tools: list[dict[str, Any]] | None = None,
    ending: str = NEW_TURN,
) -> Prompt:
    """The one prompt builder: messages through the model's chat template, or, for a model without one
    (or with `raw`), the text `plain(messages)` encoded as is. Chat, generate and summarize all come here.
    `tools` go to a template that reads them (gptcli.tools decides); `ending`: how the rendering ends
    (prompt_ending; `plain` writes the same ending itself)."""
    # The reply reads on from the prompt's text (the last message continued, or the messages alone: the model
    # writes the next header itself), unless it is a new turn's.
    continues = ending != NEW_TURN
    if raw or not tokenizer.chat_template:
        return Prompt(tokenizer.encode(plain(messages), add_special_tokens=True), templated=False, continues=continues)
    if ending == CONTINUE:
        rendered = continued_rendering(tokenizer, messages, tools)
    else:
        rendered = tokenizer.render_chat(messages, tools=tools, add_generation_prompt=ending == NEW_TURN)
    return Prompt(tokenizer.encode(rendered, add_special_tokens=False), templated=True, continues=continues)


OPEN_END = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker of where the final message's content ends


def continued_rendering(tokenizer: Tokenizer, messages: Messages, tools: list[dict[str, Any]] | None) -> str:
    """The chat template's rendering (no generation prompt) cut right after the last message's content, as
    transformers' `continue_final_message` cuts it: a marker follows the content, and the text ends where it
    starts. A template that trims the content (the marker's space gone) trims the content's trailing spaces too.
    A rendering that does not end the content as sent (a template that rewrites or drops it) is a FieldError."""
    content = messages[-1].get("content") or ""
    marked = [*messages[:-1], {**messages[-1], "content": content + OPEN_END}]
    rendered = tokenizer.render_chat(marked, tools=tools, add_generation_prompt=False)
    at = rendered.rfind(OPEN_END.strip())
    cut = rendered[: max(at, 0)]
    if at >= 0 and rendered[at : at + len(OPEN_END)] != OPEN_END and content.strip():
        cut = cut.rstrip()
    if at < 0 or not cut.rstrip().endswith(content.strip()):
        raise FieldError(
            "messages: the chat template does not write the last message (the assistant's) as sent, so the reply"
            " cannot continue it; send continue_final_message: false to answer in a new turn",
            "messages",
        )
    return cut


def encode_prompt(tokenizer: Tokenizer, text: str, *, system: str | None = None, raw: bool = False) -> Prompt:
    """Wrap text as a user message when the model has a chat template (unless raw); text sent as is is
    completed: its reply continues it."""
    prompt = build_prompt(tokenizer, messages_for(text, system), raw=raw)
    return prompt if prompt.templated else replace(prompt, continues=True)


def fit_prompt(
    tokenizer: Tokenizer,
    text: str,
    *,
    context_length: int,
    max_tokens: int,
    on_overflow: str,
    system: str | None = None,
    raw: bool = False,
) -> Prompt:
    """Encode, then check the prompt leaves room to generate; truncate from the front if asked.

    A text over PIECE_CHARS is counted a piece at a time first (encoding 16 MB at once took 2 GB), and only
    its last pieces, enough to fill the context, are ever encoded whole.
    """
    overhead = len(encode_prompt(tokenizer, "", system=system, raw=raw).ids)
    total = None
    if len(text) > PIECE_CHARS:
        text, counted = _tail_holding(tokenizer, text, context_length)
        total = counted + overhead
    if total is None or total < context_length:
        prompt = encode_prompt(tokenizer, text, system=system, raw=raw)
        total = len(prompt.ids)
        if total < context_length:
            return prompt
    if on_overflow != "truncate":
        raise InputError(
            f"the prompt is {total} tokens but the model's context holds {context_length}",
            hint="shorten the prompt, or pass --on-overflow truncate to keep its end",
        )
    # Keep the end of the user's text (the instruction usually comes last) and leave room to answer.
    reserve = max(1, min(max_tokens, context_length // 2))
    budget = context_length - reserve - overhead
    if budget < 1:
        raise InputError(
            f"the system message and template take {overhead} of the {context_length}-token context",
            hint="shorten --system",
        )
    content = tokenizer.encode(text, add_special_tokens=False)
    kept_text = tokenizer.decode(content[-budget:], skip_special_tokens=False)
    fitted = encode_prompt(tokenizer, kept_text, system=system, raw=raw)
    while len(fitted.ids) > context_length - reserve and kept_text:
        kept_text = kept_text[len(kept_text) // 10 + 1 :]  # re-tokenizing can grow a little; trim more
        fitted = encode_prompt(tokenizer, kept_text, system=system, raw=raw)
    warning = f"the prompt was {total} tokens; kept its last {len(fitted.ids)} to fit the context"
    return replace(fitted, warning=warning)


def _tail_holding(tokenizer: Tokenizer, text: str, tokens: int) -> tuple[str, int]:
    """The text's tokens, counted a piece at a time, and its shortest tail of whole pieces holding `tokens`."""
    pieces = list(text_pieces(text))
    counts = [len(tokenizer.encode(piece, add_special_tokens=False)) for piece in pieces]
    start, kept = len(pieces), 0
    while start > 0 and kept < tokens:
        start -= 1
        kept += counts[start]
    return "".join(pieces[start:]), sum(counts)
