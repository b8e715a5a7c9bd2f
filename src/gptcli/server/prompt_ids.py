"""Request bodies as prompt token ids: a chat's messages (with the tools it may call), completions' prompts."""

from __future__ import annotations

from gptcli.errors import FieldError, ModelError
from gptcli.prompts import Prompt
from gptcli.server.errors import APIError, field_error
from gptcli.server.prefill_fields import PrefillFields
from gptcli.server.schemas import ChatMessage
from gptcli.tokenizer import Tokenizer
from gptcli.tools import ToolSpec, chat_prompt


def chat_request_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    tools: ToolSpec | None = None,
    prefill: PrefillFields | None = None,
) -> Prompt:
    """Messages as `gptcli chat` builds them: the model's chat template, or a plain transcript for a base
    model; with the tools the reply may call, and how to call them (gptcli.tools); a last message from the
    assistant continued as `prefill`'s fields say (by default it is: then `continues`)."""
    turns = [m.turn(i) for i, m in enumerate(messages)]
    ending = (prefill or PrefillFields()).prompt_ending(turns, tools=tools is not None)
    try:
        prompt = chat_prompt(tokenizer, turns, tools, ending)
    except ModelError as exc:  # the template's raise_exception: roles out of order and the like
        raise APIError(400, exc.message, param="messages") from None
    except FieldError as exc:  # a last message the template does not write as sent cannot be continued
        raise field_error(exc) from None
    if not prompt.ids:
        raise APIError(400, "the messages are empty", param="messages")
    return prompt


def completion_prompts(
    tokenizer: Tokenizer, prompt: str | list[str] | list[int] | list[list[int]]
) -> list[tuple[list[int], str]]:
    """Each prompt's token ids (raw text, as `gptcli generate --raw` sends it) and its text (for echo): a
    string, a list of strings, a list of token ids (one prompt) or a list of such lists."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif isinstance(prompt[0], int):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    prompts = []
    for index, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt.{index}"
        if isinstance(item, list):
            ids = [int(i) for i in item]
            if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
                message = f"{where}: token ids must be in [0, {tokenizer.vocab_size})"
                raise APIError(400, message, param=where, code="invalid_value")
            prompts.append((ids, tokenizer.decode(ids)))
            continue
        ids = tokenizer.encode(item, add_special_tokens=True)
        if not ids:
            raise APIError(400, f"{where}: the prompt is empty", param=where, code="invalid_value")
        prompts.append((ids, item))
    return prompts
