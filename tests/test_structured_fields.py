"""vLLM's and llama-server's structured-output fields (`structured_outputs`, `guided_*`, `json_schema`, `grammar`)
on the server and in batch lines: each constrains the reply; what we cannot honour is a 400 naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from gptcli.config import Settings
from tests.conftest import run_cli

COLOURS = ["red", "green", "blue"]
CODE = r"[A-Z]{2}-[0-9]{3}"
CODE_GBNF = 'root ::= [A-Z] [A-Z] "-" digit digit digit\ndigit ::= [0-9]\n'
CODE_LARK = 'start: /[A-Z]{2}/ "-" DIGITS\nDIGITS: /[0-9]{3}/\n'
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
ARRAY = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 999},
    "minItems": 1,
    "maxItems": 3,
}  # fits -n 40
GIVEN = {  # each field, the kind of reply it must give
    "guided_choice": (COLOURS, "choice"),
    "structured_outputs": ({"choice": COLOURS}, "choice"),
    "guided_regex": (CODE, "code"),
    "structured_outputs.regex": ({"regex": CODE, "disable_fallback": True}, "code"),
    "grammar": (CODE_GBNF, "code"),  # llama-server's: GBNF
    "guided_grammar": (CODE_LARK, "code"),  # vLLM's (guidance backend): Lark
    "structured_outputs.grammar": ({"grammar": CODE_GBNF}, "code"),
    "json_schema": (ARRAY, "array"),  # llama-server's
    "guided_json": (json.dumps(ARRAY), "array"),  # vLLM's older field takes the schema's JSON text too
    "structured_outputs.json": ({"json": ARRAY, "disable_any_whitespace": True}, "array"),
    "structured_outputs.json_object": ({"json_object": True}, "object"),
}


@pytest.fixture(scope="module")
def server(tiny_models):
    pytest.importorskip("fastapi")
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    runtime = open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)
    with serve_runtime(runtime, max_running=8) as live:
        yield live


def fits(kind: str, text: str) -> bool:
    if kind == "choice":
        return text in COLOURS
    if kind == "code":
        return re.fullmatch(CODE, text) is not None
    if kind == "object":  # any JSON object: a random model's may be cut at max_tokens
        return text.startswith("{")
    jsonschema.validate(json.loads(text), ARRAY)
    return True


@pytest.mark.parametrize("name", list(GIVEN))
def test_each_field_constrains_a_sampled_reply_in_chat_and_text_completions(server, name):
    httpx = pytest.importorskip("httpx")
    value, kind = GIVEN[name]
    field = {name.split(".")[0]: value, "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " *"}
    for seed in range(3):
        body = {"temperature": 1.0, "seed": seed, "max_tokens": 40, **field}
        chat = {**body, "messages": [{"role": "user", "content": "Answer."}], "stream": seed == 2}
        reply = httpx.post(server.v1 + "/chat/completions", json=chat, timeout=60)
        assert reply.status_code == 200, reply.text
        if seed == 2:  # streamed
            chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        else:
            text = reply.json()["choices"][0]["message"]["content"]
        assert fits(kind, text), (name, seed, text)
        done = httpx.post(server.v1 + "/completions", json={**body, "prompt": "x"}, timeout=60).json()
        assert fits(kind, done["choices"][0]["text"]), (name, seed, done)


REFUSED = [  # (fields, the param the 400 names, what its message starts with)
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not supported"),
    (
        {"structured_outputs": {"disable_additional_properties": True}},
        "structured_outputs.disable_additional_properties",
        "not supported",
    ),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn", "not a field of structured_outputs"),
    ({"structured_outputs": "regex"}, "structured_outputs", "must be an object"),
    ({"structured_outputs": {}}, "structured_outputs", "names no kind of structured output"),  # not free text
    ({"structured_outputs": {"disable_fallback": True}}, "structured_outputs", "names no kind of structured output"),
    ({"structured_outputs": {"json": None}}, "structured_outputs", "names no kind of structured output"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object", "must be true or false"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice", "goes with no other"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "goes with no other structured output (guided_"),
    ({"guided_json": {}, "response_format": {"type": "json_object"}}, "guided_json", "goes with no other"),
    ({"grammar": 'root ::= "a"', "structured_outputs": {"regex": "a"}}, "grammar", "goes with no other"),
    ({"guided_choice": []}, "guided_choice", "must be a list of one or more non-empty strings"),
    ({"guided_choice": ["yes", 1]}, "guided_choice", "must be a list of one or more non-empty strings"),
    ({"guided_regex": 5}, "guided_regex", "must be a regular expression"),
    ({"guided_regex": "("}, "guided_regex", "invalid regex '(': unclosed group"),
    ({"guided_regex": r"[^\s\S]"}, "guided_regex", r"invalid regex '[^\s\S]': it matches no text at all"),
    ({"grammar": 'root ::= "a" (\n'}, "grammar", "invalid GBNF grammar: Expected ')' at line 2"),
    (
        {"guided_grammar": 'start: "a" | b\nb: /[a-/\n'},
        "guided_grammar",
        "invalid grammar at line 2 ('b: /[a-/'): invalid regex",
    ),
    (
        {"json_schema": {"type": "array", "uniqueItems": True}},
        "json_schema",
        "JSON Schema keyword not supported: uniqueItems",
    ),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
]


@pytest.mark.parametrize(("fields", "param", "said"), REFUSED)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(server, fields, param, said):
    httpx = pytest.importorskip("httpx")
    bodies = [
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **fields}),
        ("/completions", {"prompt": "hi", **fields}),
    ]
    for path, body in bodies:
        response = httpx.post(server.v1 + path, json={"max_tokens": 4, **body}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: {said}"), error
        assert "\n" not in error["message"]


def test_structured_output_beside_tools_is_a_400_before_the_prompt_is_built(server):
    httpx = pytest.importorskip("httpx")
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "max_tokens": 8}
    refused = httpx.post(server.v1 + "/chat/completions", json={**body, "guided_choice": COLOURS}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "guided_choice", refused.text
    assert "does not go with tools" in refused.json()["error"]["message"]
    from gptcli.server.schemas import ChatRequest

    fine = {**body, "response_format": {"type": "json_object"}, "structured_outputs": {"json_object": False}}
    ChatRequest.model_validate(fine).refuse_beside_tools()  # a JSON response_format, and a false json_object


def test_batch_lines_take_the_same_fields_each_bad_one_that_lines_error(tiny_models, tmp_path):
    lines = [
        {"id": "choice", "prompt": "x", "guided_choice": COLOURS, "temperature": 1.0},
        {"id": "regex", "prompt": "x", "structured_outputs": {"regex": CODE}, "temperature": 1.0},
        {"id": "gbnf", "prompt": "x", "grammar": CODE_GBNF, "guided_decoding_backend": "outlines"},
        {"id": "lark", "messages": [{"role": "user", "content": "x"}], "guided_grammar": CODE_LARK},
        {"id": "json", "prompt": "x", "json_schema": ARRAY},
        {"id": "two", "prompt": "x", "guided_regex": "a", "response_format": {"type": "json_object"}},
        {"id": "tag", "prompt": "x", "structured_outputs": {"structural_tag": "{}"}},
        {"id": "none", "prompt": "x", "structured_outputs": {"disable_any_whitespace": True}},
        {"id": "empty", "prompt": "x", "grammar": "root ::= [a&&b]"},  # found against the vocabulary, as the server
        {"id": "bad", "prompt": "x", "grammar": 'root ::= "a" (\n'},
        {"id": "tools", "messages": [{"role": "user", "content": "x"}], "guided_json": {}, "tools": [TOOL]},
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = run_cli("generate", "--batch", str(rows), "-m", str(tiny_models["llama"]), "-n", "40", "-o", str(out))
    assert run.returncode == 0, run.stderr.decode()
    results = {r["id"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    kinds = {"choice": "choice", "regex": "code", "gbnf": "code", "lark": "code", "json": "array"}
    for line_id, kind in kinds.items():
        assert fits(kind, results[line_id]["text"]), results[line_id]
    named = ("two", "tag", "none", "empty", "bad", "tools")
    errors = {line_id: results[line_id]["error"]["message"] for line_id in named}
    assert errors["two"].startswith("guided_regex: goes with no other structured output (response_format")
    assert errors["tag"].startswith("structured_outputs.structural_tag: not supported")
    assert errors["none"].startswith("structured_outputs: names no kind of structured output")
    assert errors["empty"] == "grammar: invalid grammar: it matches no text at all"
    assert errors["bad"].startswith("grammar: invalid GBNF grammar: Expected ')' at line 2")
    assert errors["tools"].startswith("guided_json: does not go with tools")


def test_a_batch_lines_regex_or_grammar_is_refused_with_url_naming_the_field():
    from gptcli.batch_requests import parse_request

    line = json.dumps({"prompt": "x", "grammar": CODE_GBNF}).encode()
    refused = parse_request(1, line, None, Settings(), 2048)
    assert refused.error == "grammar: does not work with --url: OpenAI's response_format has only JSON"
    sent = parse_request(2, json.dumps({"prompt": "x", "guided_json": ARRAY}).encode(), None, Settings(), 2048)
    assert sent.error is None and sent.settings.sampling.constraint.kind == "json_schema"  # as response_format


def test_a_schema_too_deep_for_the_grammar_engine_is_a_400_and_the_server_lives_on(server):
    """One request with a 5,000-link $ref chain (in `response_format`, or a tool's parameters) killed the whole
    server with SIGSEGV: every client's connection dropped."""
    httpx = pytest.importorskip("httpx")
    from tests.test_structured_grammars import ref_chain

    deep = ref_chain(5000)
    schema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", **deep}}}
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"response_format": schema}, {"tools": [tool], "tool_choice": "required"}):
        reply = httpx.post(server.v1 + "/chat/completions", json={"messages": messages, **extra}, timeout=60)
        assert reply.status_code == 400, reply.text
        assert "5,00" in reply.json()["error"]["message"] and "deep" in reply.json()["error"]["message"]
    assert httpx.post(server.v1 + "/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code == 200


def test_a_structured_reply_the_repetition_stop_cut_is_not_said_to_have_finished(server):
    """A schema's string that the model spun in a loop was cut by the repetition stop and served as `stop`, so
    OpenAI's `parse()` and LangChain read its partial JSON as a whole match (a pydantic "EOF" error instead of
    `LengthFinishReasonError`). Every API says it was cut: `length`, `incomplete`, `done_reason` "length"."""
    httpx = pytest.importorskip("httpx")
    spin = {"type": "string", "pattern": "^(ab)+c$"}  # the tiny model writes "abab..." at temperature 0
    messages = [{"role": "user", "content": "hi"}]
    chat = {"temperature": 0, "max_tokens": 100, "messages": messages}
    chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "spin", "schema": spin}}
    whole = httpx.post(server.v1 + "/chat/completions", json=chat, timeout=60).json()
    assert whole["choices"][0]["finish_reason"] == "length", whole
    assert whole["usage"]["completion_tokens"] < 100  # cut by the repetition stop, not by max_tokens
    streamed = httpx.post(server.v1 + "/chat/completions", json={**chat, "stream": True}, timeout=60).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if "finish_reason" in line]
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert reasons[-1] == "length", streamed
    text = {"temperature": 0, "max_tokens": 100, "prompt": "x", "guided_regex": "(ab)+c"}
    done_text = httpx.post(server.v1 + "/completions", json=text, timeout=60).json()
    assert done_text["choices"][0]["finish_reason"] == "length", done_text
    fmt = {"type": "json_schema", "name": "spin", "schema": spin}
    response = {"temperature": 0, "max_output_tokens": 100, "input": "hi", "text": {"format": fmt}}
    answer = httpx.post(server.v1 + "/responses", json=response, timeout=60).json()
    assert (answer["status"], answer["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"}), answer
    options = {"temperature": 0, "num_predict": 100}
    ollama = {"stream": False, "options": options, "messages": messages, "format": spin}
    done = httpx.post(server.v1.removesuffix("/v1") + "/api/chat", json=ollama, timeout=60).json()
    assert done["done_reason"] == "length", done
    # Without a grammar, a loop cut is still `stop` (the README's choice): one token forced by its logit bias.
    free = {"temperature": 0, "max_tokens": 100, "prompt": "x", "logit_bias": {"70": 100}}
    plain = httpx.post(server.v1 + "/completions", json=free, timeout=60).json()
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 100, plain
