"""Assistant prefill: a chat whose last message is the assistant's is continued (llama-server's default, vLLM's
continue_final_message), on the server, /tokenize and in batch lines, by one rule (gptcli.prompts.prompt_ending)
and one rendering (the chat template cut right after the message's content, or the plain transcript)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gptcli.config import Settings, with_sampling
from gptcli.errors import FieldError
from gptcli.prompts import BARE, CONTINUE, NEW_TURN, prompt_ending
from gptcli.tokenizer import Tokenizer
from gptcli.tools import chat_prompt
from tests import batch_lines

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ASK = {"role": "user", "content": "List three colours."}
BEGUN = {"role": "assistant", "content": "1. Red\n2."}
PREFILLED = [ASK, BEGUN]
PREFIX = "<|im_start|>user\nList three colours.<|im_end|>\n<|im_start|>assistant\n1. Red\n2."  # ChatML's, cut
CALLS = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]
SETTINGS = with_sampling(Settings(), temperature=0.0, max_tokens=12)


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


# ------------------------------------------------------------------------------------------------ server


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


@pytest.fixture(scope="module")
def live(runtime) -> Iterator[Any]:
    from tests.test_server import serve_runtime

    with serve_runtime(runtime, max_running=4) as server:
        yield server


@pytest.mark.parametrize("template", UNWRITTEN)
def test_a_template_that_cannot_continue_the_message_is_a_400_naming_messages(tiny_models, tmp_path, template):
    from gptcli.server.errors import APIError
    from gptcli.server.prompt_ids import chat_request_prompt
    from gptcli.server.schemas import ChatMessage

    tok = with_template(tiny_models, tmp_path, template)
    with pytest.raises(APIError) as caught:
        chat_request_prompt(tok, [ChatMessage(**m) for m in PREFILLED])
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert caught.value.message.startswith("messages: the chat template does not write the last message")


def chat(live: Any, messages: list[dict[str, Any]], **fields: Any) -> httpx.Response:
    body = {"model": "tiny-llama", "messages": messages, "temperature": 0, "max_tokens": 12, **fields}
    return httpx.post(live.v1 + "/chat/completions", json=body, timeout=60)


def prefix_tokens(runtime: Any) -> int:
    return len(runtime.tokenizer.encode(PREFIX, add_special_tokens=False))


def raw_reply(runtime: Any, text: str) -> str:
    """What `gptcli generate --raw` gives for the text at temperature 0 (the same loop, in-process)."""
    from tests.test_server import reference

    return reference(runtime, text, 12, raw=True).text


def test_the_reply_continues_the_assistants_text_as_generate_raw_does_its_prefix(live, runtime):
    continued = raw_reply(runtime, PREFIX)
    reply = chat(live, PREFILLED).json()
    assert reply["choices"][0]["message"]["content"] == continued  # only the continuation
    assert reply["usage"]["prompt_tokens"] == prefix_tokens(runtime)
    vllm = {"continue_final_message": True, "add_generation_prompt": False}
    assert chat(live, PREFILLED, **vllm).json()["choices"][0]["message"]["content"] == continued
    turn = chat(live, PREFILLED, continue_final_message=False).json()  # as before: a new turn after the finished one
    new_turn = runtime.tokenizer.decode(
        chat_prompt(runtime.tokenizer, PREFILLED, None, NEW_TURN).ids, skip_special_tokens=False
    )
    assert turn["choices"][0]["message"]["content"] == raw_reply(runtime, new_turn)
    assert turn["usage"]["prompt_tokens"] > reply["usage"]["prompt_tokens"]


def test_a_streamed_reply_is_only_the_continuation_too(live, runtime):
    body = {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST",
        live.v1 + "/chat/completions",
        json={"model": "tiny-llama", "messages": PREFILLED, "temperature": 0, "max_tokens": 12, **body},
        timeout=60,
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == raw_reply(runtime, PREFIX)
    assert events[-1]["usage"]["prompt_tokens"] == prefix_tokens(runtime)


@pytest.mark.parametrize(
    "fields",
    [{}, {"continue_final_message": True, "add_generation_prompt": False}, {"continue_final_message": False}],
)
def test_tokenize_counts_the_prompt_the_chat_route_runs(live, runtime, fields):
    tokens = httpx.post(live.url + "/tokenize", json={"messages": PREFILLED, **fields}, timeout=60).json()
    assert tokens["count"] == chat(live, PREFILLED, **fields).json()["usage"]["prompt_tokens"]
    prefix = PREFIX + ("<|im_end|>\n<|im_start|>assistant\n" if fields.get("continue_final_message") is False else "")
    assert tokens["tokens"] == runtime.tokenizer.encode(prefix, add_special_tokens=False)


def test_tokenize_without_a_generation_prompt(live, runtime):
    tokens = httpx.post(live.url + "/tokenize", json={"messages": [ASK], "add_generation_prompt": False}).json()
    text = "<|im_start|>user\nList three colours.<|im_end|>\n"
    assert tokens["tokens"] == runtime.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    ("fields", "messages", "param"),
    [
        ({"continue_final_message": True}, [ASK], "continue_final_message"),
        ({"continue_final_message": True, "add_generation_prompt": True}, PREFILLED, "continue_final_message"),
        ({"continue_final_message": "true"}, PREFILLED, "continue_final_message"),
        ({"add_generation_prompt": "no"}, PREFILLED, "add_generation_prompt"),
        ({"continue_final_message": True, "tools": TOOLS}, PREFILLED, "continue_final_message"),
    ],
)
def test_a_prefill_field_that_does_not_fit_is_a_400_naming_it(live, fields, messages, param):
    for route, body in (("/v1/chat/completions", {"temperature": 0}), ("/tokenize", {})):
        response = httpx.post(live.url + route, json={"messages": messages, **fields, **body}, timeout=60)
        assert response.status_code == 400, route
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: "), (route, error)


def test_structured_output_constrains_the_continuation(live, runtime):
    steer = [ASK, {"role": "assistant", "content": "My answer (yes or no): "}]
    reply = chat(live, steer, structured_outputs={"choice": ["yes", "no"]}).json()
    assert reply["choices"][0]["message"]["content"] in ("yes", "no")
    text = PREFIX.replace("1. Red\n2.", steer[1]["content"])
    assert reply["usage"]["prompt_tokens"] == len(runtime.tokenizer.encode(text, add_special_tokens=False))


# ------------------------------------------------------------------------------------------------ batch


def run_lines(live: Any, runtime: Any, lines: list[dict[str, Any]], *, remote: bool) -> list[dict[str, Any]]:
    return batch_lines.run_lines(runtime, live.v1, lines, SETTINGS, remote=remote, running=2)


LINES = [
    {"id": "prefilled", "messages": PREFILLED},
    {"id": "vllm", "messages": PREFILLED, "continue_final_message": True, "add_generation_prompt": False},
    {"id": "new turn", "messages": PREFILLED, "continue_final_message": False},
]


def test_a_batch_line_is_continued_as_the_server_continues_it_here_and_through_url(live, runtime):
    here = run_lines(live, runtime, LINES, remote=False)
    there = run_lines(live, runtime, LINES, remote=True)
    for line, mine, theirs in zip(LINES, here, there, strict=True):
        fields = {key: value for key, value in line.items() if key not in ("id", "messages")}
        served = chat(live, PREFILLED, **fields).json()
        assert mine["text"] == theirs["text"] == served["choices"][0]["message"]["content"], line["id"]
        assert mine["usage"]["prompt_tokens"] == served["usage"]["prompt_tokens"], line["id"]
    assert here[0]["text"] == here[1]["text"] != here[2]["text"]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ({"messages": [ASK], "continue_final_message": True}, "continue_final_message: the last message must be"),
        ({"messages": PREFILLED, "add_generation_prompt": "no"}, "add_generation_prompt: must be true or false"),
        ({"prompt": "hi", "continue_final_message": True}, "`continue_final_message` goes with `messages`"),
        (
            {"messages": PREFILLED, "continue_final_message": True, "tools": TOOLS},
            "continue_final_message: does not go with tools",
        ),
    ],
)
def test_a_prefill_field_that_does_not_fit_is_that_lines_error_naming_it(runtime, line, error):
    from gptcli.batch_requests import parse_request

    for tokenizer in (runtime.tokenizer, None):  # here, and before a line is sent to a server
        request = parse_request(1, json.dumps(line).encode(), tokenizer, SETTINGS, 128)
        assert request.error is not None and request.error.startswith(error), (tokenizer, request.error)


@pytest.mark.integration
def test_the_default_model_continues_a_begun_list_rather_than_repeating_it(default_model):
    from types import SimpleNamespace

    from gptcli.backends.base import LoadOptions, get_backend_class
    from tests.test_server import serve_runtime

    backend = get_backend_class("torch").load(default_model.path, LoadOptions(device="cpu", dtype="float32"))
    served = SimpleNamespace(backend=backend, tokenizer=Tokenizer(default_model.path))
    with serve_runtime(served) as server:
        reply = chat(server, PREFILLED, max_tokens=8).json()["choices"][0]["message"]["content"]
        again = chat(server, PREFILLED, max_tokens=8, continue_final_message=False).json()
    assert reply.startswith(" ") and "3." in reply and "1. Red" not in reply, reply  # " Blue\n3. Green"
    assert again["choices"][0]["message"]["content"].startswith("1. Red"), again  # a new turn repeats it
