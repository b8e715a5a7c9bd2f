"""vLLM's stopping options on the server (min_tokens, stop_token_ids, include_stop_str_in_output) and in
batch lines: applied by the one decoding loop, checked by one check (gptcli.stopping), bad ones named."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.test_batchfile import _alone, _run
from tests.test_batchfile import model as model  # the batch tests' fixture: the tiny Llama

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def runtime(tiny_models):
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime

    return open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)


@pytest.fixture(scope="module")
def live(runtime) -> Iterator[Any]:
    from tests.test_server import serve_runtime

    with serve_runtime(runtime) as server:
        yield server


def complete(live: Any, **fields: Any) -> Any:
    ask = {"model": "tiny-llama", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 16}
    return live.client().completions.create(**{**ask, **fields}).choices[0]


def test_min_tokens_outlasts_a_forced_end_of_sequence(live, runtime):
    eos = {str(min(runtime.tokenizer.eos_ids)): 100}
    assert complete(live, logit_bias=eos).text == ""
    client = live.client()
    reply = client.completions.create(
        model="tiny-llama", prompt="Once", temperature=0, max_tokens=16, logit_bias=eos, extra_body={"min_tokens": 5}
    )
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (5, "stop")
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=16,
        logit_bias=eos,
        extra_body={"min_tokens": 5},
    )
    assert (chat.usage.completion_tokens, chat.choices[0].finish_reason) == (5, "stop")


def test_a_forced_stop_token_id_ends_the_reply_without_its_text(live, runtime):
    forced = {"42": 100}
    choice = complete(live, logit_bias=forced, extra_body={"stop_token_ids": [42]})
    assert (choice.text, choice.finish_reason) == ("", "stop")
    choice = complete(live, logit_bias=forced, extra_body={"stop_token_ids": [42], "include_stop_str_in_output": True})
    assert (choice.text, choice.finish_reason) == (runtime.tokenizer.decode([42]), "stop")
    choice = complete(live, logit_bias=forced, extra_body={"stop_token_ids": [42], "min_tokens": 3})
    assert choice.finish_reason == "stop" and runtime.tokenizer.decode([42]) not in choice.text


def test_include_stop_str_in_output_keeps_the_stop_string_streamed_or_not(live):
    whole = complete(live).text
    stop = whole[4:7]
    assert stop.strip() and whole.index(stop) == 4
    assert complete(live, stop=[stop]).text == whole[:4]
    kept = {"include_stop_str_in_output": True}
    assert complete(live, stop=[stop], extra_body=kept).text == whole[:7]
    chunks = live.client().completions.create(
        model="tiny-llama",
        prompt="The capital of France is",
        temperature=0,
        max_tokens=16,
        stop=[stop],
        stream=True,
        extra_body=kept,
    )
    pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks if c.choices]
    assert "".join(text for text, _ in pieces) == whole[:7] and pieces[-1][1] == "stop"


BAD = [
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": True}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"stop_token_ids": [400]}, "stop_token_ids"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": "5"}, "stop_token_ids"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_a_bad_stop_option_is_a_400_naming_it(live, fields, param):
    hi = [{"role": "user", "content": "hi"}]
    for route, body in (("/chat/completions", {"messages": hi}), ("/completions", {"prompt": "hi"})):
        response = httpx.post(live.v1 + route, json={**body, **fields})
        assert response.status_code == 400, (route, fields, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: "), error
    # Chat's max_completion_tokens is the max_tokens min_tokens is held to.
    response = httpx.post(
        live.v1 + "/chat/completions", json={"messages": hi, "max_completion_tokens": 2, "min_tokens": 3}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"
    assert response.json()["error"]["message"] == "min_tokens: must be at most max_completion_tokens (2), got 3"


MORE_THAN_THE_CONTEXT = {"max_tokens": 1000, "min_tokens": 200}  # the tiny Llama's context is 128 tokens


def test_min_tokens_the_context_cannot_hold_after_the_prompt_is_a_400_naming_the_bound(live, runtime):
    """It ran to the context's end, never reaching min_tokens (minutes on a real model); max_tokens left out is the
    server's default (512), which min_tokens 200 was within."""
    prompt = len(runtime.tokenizer.encode("hi", add_special_tokens=False))
    for fields in (MORE_THAN_THE_CONTEXT, {"min_tokens": 200}):
        response = httpx.post(live.v1 + "/completions", json={"prompt": "hi", **fields})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "min_tokens"
        assert response.json()["error"]["message"] == (
            f"min_tokens: must be at most {128 - prompt}, what the model's context (128 tokens) holds after the"
            f" prompt ({prompt} tokens), got 200"
        )
    chat = {"messages": [{"role": "user", "content": "hi"}], **MORE_THAN_THE_CONTEXT}
    response = httpx.post(live.v1 + "/chat/completions", json=chat)
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens", response.text
    fits = complete(live, prompt="hi", max_tokens=1000, extra_body={"min_tokens": 128 - prompt})
    assert fits.finish_reason == "length"  # the whole context, as min_tokens asked
    # The reply ran one token past what min_tokens' bound said fits: prompt and reply now fill the context.
    body = {"prompt": [5] * 126, "max_tokens": 16, "ignore_eos": True, "min_tokens": 2}
    usage = httpx.post(live.v1 + "/completions", json=body).json()["usage"]
    assert (usage["completion_tokens"], usage["total_tokens"]) == (2, 128)


def test_batch_lines_take_the_stop_options(model):
    prompt = "The capital of France is"
    first, second = _alone(model, prompt, raw=True).token_ids[:2]
    assert first != second
    line = {"prompt": prompt, "raw": True}
    lines = [
        json.dumps({**line, "id": "stop", "stop_token_ids": [second]}),
        json.dumps({**line, "id": "kept", "stop_token_ids": [second], "include_stop_str_in_output": True}),
        json.dumps({**line, "id": "least", "stop_token_ids": [first], "min_tokens": 4, "max_tokens": 6}),
    ]
    summary, results = _run(model, lines)
    assert summary.ok == 3, results
    one, two = (_alone(model, prompt, raw=True, max_tokens=n).text for n in (1, 2))
    assert (results[0]["text"], results[0]["finish_reason"], results[0]["usage"]["completion_tokens"]) == (
        one,
        "stop",
        1,
    )
    assert (results[1]["text"], results[1]["finish_reason"], results[1]["usage"]["completion_tokens"]) == (
        two,
        "stop",
        2,
    )
    assert results[2]["usage"]["completion_tokens"] >= 4


def test_a_bad_stop_option_is_that_lines_error_as_the_server_words_it(model):
    lines = [json.dumps({"prompt": "hi", "max_tokens": 10, **fields}) for fields, _ in BAD]
    lines.append(json.dumps({"prompt": "hi", "stop_token_ids": [5], "response_format": {"type": "json_object"}}))
    _, results = _run(model, lines)
    for (fields, param), result in zip(BAD, results, strict=False):
        assert result["error"]["message"].startswith(f"{param}: "), (fields, result)
    assert results[0]["error"]["message"] == "min_tokens: must be at most max_tokens (4), got 5"
    assert results[-1]["error"]["message"].startswith("`stop_token_ids` does not go with structured output")
    _, (beyond,) = _run(model, [json.dumps({"prompt": "hi", "raw": True, **MORE_THAN_THE_CONTEXT})])
    assert beyond["error"]["message"].startswith("min_tokens: must be at most 12"), beyond  # not a whole context run
    assert "what the model's context (128 tokens) holds after the prompt" in beyond["error"]["message"]


def test_the_stop_options_go_to_a_server_as_a_batch_run_with_url_sends_them(live, runtime):
    from gptcli.config import SamplingConfig
    from gptcli.engine import generate
    from gptcli.prompts import encode_prompt
    from gptcli.remote import RemoteModel

    prompt = "The capital of France is"
    ids = encode_prompt(runtime.tokenizer, prompt, raw=True).ids
    *_, alone = generate(runtime.backend, runtime.tokenizer, ids, SamplingConfig(temperature=0, max_tokens=8))
    params = SamplingConfig(temperature=0, max_tokens=8, stop_token_ids=(alone.token_ids[1],), min_tokens=1)
    *_, local = generate(runtime.backend, runtime.tokenizer, ids, params)
    *_, remote = RemoteModel(live.v1).complete(prompt, params)
    assert (remote.text, remote.reason, remote.stats.new_tokens) == (local.text, "stop", 1)
