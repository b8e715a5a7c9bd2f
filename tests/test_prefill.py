"""Assistant prefill: a chat whose last message is the assistant's is continued (llama-server's default, vLLM's
continue_final_message), by one rule (gptcli.prompts.prompt_ending) and one rendering (the chat template cut right
after the message's content, or the plain transcript)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptcli.errors import FieldError
from gptcli.prompts import BARE, CONTINUE, NEW_TURN, prompt_ending
from gptcli.tokenizer import Tokenizer
from gptcli.tools import chat_prompt

ASK = {"role": "user", "content": "List three colours."}
BEGUN = {"role": "assistant", "content": "1. Red\n2."}
PREFILLED = [ASK, BEGUN]
PREFIX = "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n1. Red\n2."  # ChatML's, cut
CALLS = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    ("fields", "messages", "tools", "ending"),
    [
        ({}, PREFILLED, False, CONTINUE),  # llama-server's default
        ({}, [ASK], False, NEW_TURN),
        ({"continue_final_message": True, "add_generation_prompt": False}, PREFILLED, False, CONTINUE),  # vLLM's
        ({"add_generation_prompt": False}, PREFILLED, False, CONTINUE),
        ({"continue_final_message": False}, PREFILLED, False, NEW_TURN),  # as before: a new turn
        ({"add_generation_prompt": True}, PREFILLED, False, NEW_TURN),
        ({"continue_final_message": False, "add_generation_prompt": False}, PREFILLED, False, BARE),
        ({"add_generation_prompt": False}, [ASK], False, BARE),  # vLLM renders no generation prompt
        ({}, [ASK, {"role": "assistant", "content": "", "tool_calls": CALLS}], False, NEW_TURN),
        ({}, PREFILLED, True, NEW_TURN),  # a reply that may call tools is JSON of its own
    ],
)
def test_how_a_chat_prompt_ends(fields, messages, tools, ending):
    assert prompt_ending(fields, messages, tools=tools) == ending


@pytest.mark.parametrize(
    ("fields", "messages", "tools", "param", "says"),
    [
        ({"continue_final_message": "yes"}, PREFILLED, False, "continue_final_message", "must be true or false"),
        ({"add_generation_prompt": 1}, PREFILLED, False, "add_generation_prompt", "must be true or false"),
        (
            {"continue_final_message": True, "add_generation_prompt": True},
            PREFILLED,
            False,
            "continue_final_message",
            "does not go with add_generation_prompt: true",
        ),
        ({"continue_final_message": True}, [ASK], False, "continue_final_message", "(this one is the user's)"),
        (
            {"continue_final_message": True},
            [ASK, {"role": "assistant", "content": None, "tool_calls": CALLS}],
            False,
            "continue_final_message",
            "(this one is its tool calls)",
        ),
        ({"continue_final_message": True}, PREFILLED, True, "continue_final_message", "does not go with tools"),
    ],
)
def test_a_prefill_field_that_does_not_fit_is_named(fields, messages, tools, param, says):
    with pytest.raises(FieldError) as caught:
        prompt_ending(fields, messages, tools=tools)
    assert caught.value.param == param and caught.value.message.startswith(f"{param}: ")
    assert says in caught.value.message


def test_the_template_is_cut_right_after_the_last_message_and_tokenized_once(tiny_models):
    tok = Tokenizer(tiny_models["llama"])
    ids = chat_prompt(tok, PREFILLED, None, CONTINUE).ids
    assert ids == tok.encode(PREFIX, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == PREFIX
    bare = tok.decode(chat_prompt(tok, PREFILLED, None, BARE).ids, skip_special_tokens=False)
    assert bare == PREFIX + "<|im_end|>\n"  # the finished turn, and no generation prompt


def test_a_model_without_a_chat_template_continues_its_transcript(tiny_models):
    tok = Tokenizer(tiny_models["gpt2"])
    written = tok.decode(chat_prompt(tok, PREFILLED, None, CONTINUE).ids, skip_special_tokens=False)
    assert written == "User: List three colours.\nAssistant: 1. Red\n2."
    bare = tok.decode(chat_prompt(tok, [ASK], None, BARE).ids, skip_special_tokens=False)
    assert bare == "User: List three colours."


def with_template(tiny_models: dict[str, Path], folder: Path, template: str) -> Tokenizer:
    """The tiny Llama's tokenizer with another chat template."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_models["llama"] / name).is_file():
            shutil.copy(tiny_models["llama"] / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return Tokenizer(folder)


TRIMMING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_trims_the_content_trims_its_trailing_spaces(tiny_models, tmp_path):
    tok = with_template(tiny_models, tmp_path, TRIMMING)
    steer = [ASK, {"role": "assistant", "content": "  The answer is "}]
    written = tok.decode(chat_prompt(tok, steer, None, CONTINUE).ids, skip_special_tokens=False)
    assert written == "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\nThe answer is"
    empty = [ASK, {"role": "assistant", "content": ""}]  # the assistant's turn begun: its header kept whole
    assert tok.decode(chat_prompt(tok, empty, None, CONTINUE).ids, skip_special_tokens=False).endswith("assistant\n")


UNWRITTEN = [
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}",  # rewritten
    "{% for m in messages if m['role'] == 'user' %}{{ m['content'] + '\n' }}{% endfor %}",  # left out
]


@pytest.mark.parametrize("template", UNWRITTEN)
def test_a_template_that_does_not_write_the_message_as_sent_cannot_continue_it(tiny_models, tmp_path, template):
    tok = with_template(tiny_models, tmp_path, template)
    with pytest.raises(FieldError, match="continue_final_message: false to answer in a new turn") as caught:
        chat_prompt(tok, PREFILLED, None, CONTINUE)
    assert caught.value.param == "messages"
