"""scripts/fuzz_server.py's seeded subset (mutated requests to the in-process app, mutated batch lines), and the
failures it found, each as the one request or line that shows it."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import REPO, load_script

pytest.importorskip("httpx")  # starlette's TestClient
pytest.importorskip("fastapi")


fuzz = load_script("fuzz_server")


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("fuzz") / "tiny-llama"
    shutil.copytree(tiny_models["llama"], folder)
    with fuzz.app_client(fuzz.widen_context(folder)) as client:
        yield client


def test_mutated_requests_get_a_documented_answer_and_batch_lines_a_result(client):
    """A seeded few hundred of scripts/fuzz_server.py's cases (its --cases N --seed S runs thousands)."""
    failures = fuzz.fuzz_server(client, cases=500, seed=0) + fuzz.fuzz_batch(client.runtime, cases=500, seed=0)
    assert not failures, "\n".join(str(failure) for failure in failures[:5])


def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert not fuzz.error_problems(response.json()), response.text
    return response.json()["error"]


def test_a_lone_surrogate_in_a_key_is_a_400_naming_it(client):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "min_token\\ud800s": 1}'
    error = error_of(client.post("/v1/chat/completions", content=body))  # was a 500: the message was no UTF-8
    assert error["param"] == "min_token\\ud800s" and "lone UTF-16 surrogate" in error["message"]
    nested = b'{"messages": [{"role": "user", "\\udc80": "x", "content": "hi"}]}'
    assert error_of(client.post("/v1/chat/completions", content=nested))["param"] == "messages.0.\\udc80"


def test_a_tools_schema_whose_keywords_have_the_wrong_type_is_a_400_naming_the_parameters(client):
    for schema, why in (
        ({"properties": [None]}, "properties must be an object"),  # was a 500: closing took it for an object
        ({"properties": "city"}, "properties must be an object"),
        ({"allOf": 1}, "allOf must be an array"),  # a 500: closing took it for a list of parts
        ({"properties": {"a": {}}, "anyOf": True}, "anyOf must be an array"),
    ):
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
        error = error_of(client.post("/v1/chat/completions", json=body))
        assert error["param"] == "tools.0.function.parameters" and why in error["message"], (schema, error)


def test_a_schema_nested_past_what_python_walks_is_a_400_and_a_batch_lines_error(client):
    from gptcli.batch_requests import parse_request
    from gptcli.config import Settings

    deep = b"[" * 600 + b"]" * 600  # was a 500 (RecursionError): json.loads reads it, the schema's walks did not
    hi = b'"messages": [{"role": "user", "content": "hi"}]'
    tools = b'"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": %s}}}]' % deep
    format_ = (
        b'"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"items": %s}}}' % deep
    )
    for field, param in ((tools, "tools.0.function.parameters"), (format_, "response_format.json_schema.schema")):
        error = error_of(client.post("/v1/chat/completions", content=b"{%s, %s}" % (hi, field)))
        assert error["param"] == param and "nested too deeply" in error["message"], error
        line = parse_request(1, b"{%s, %s}" % (hi, field), client.runtime.tokenizer, Settings(), 2048)
        assert line.error is not None and "nested too deeply" in line.error  # it ended the run


def test_an_error_that_quotes_what_it_was_sent_is_one_short_line(client):
    hi = [{"role": "user", "content": "hi"}]
    error = error_of(client.post("/v1/chat/completions", json={"model": "a\nb", "messages": hi}), 404)
    assert error["message"] == "the model 'a\\nb' does not exist: this server serves 'tiny'"  # was two lines
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": ["x" * 100] * 5000}}}
    error = error_of(client.post("/v1/chat/completions", json={"messages": hi, "tools": [tool]}))
    assert error["message"].startswith("tools.0.function.parameters: must describe an object")
    assert len(error["message"]) <= 1000 and error["message"].endswith("characters more)")  # was 700,000


def test_a_batch_lines_error_is_one_short_line():
    from gptcli.batch_requests import error_record

    message = error_record("1", "tools.1.function.name: 'a\nb' names two tools" + "x" * 5000)["error"]["message"]
    assert message.startswith("tools.1.function.name: 'a\\nb' names two tools") and len(message) <= 1000


def test_a_logit_bias_key_of_thousands_of_digits_is_a_400_that_says_so(client):
    body = {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7" * 5000: 1}}
    error = error_of(client.post("/v1/chat/completions", json=body))
    # was "Exceeds the limit (4300 digits) for integer string conversion ...; use sys.set_int_max_str_digits()"
    assert error["message"] == "logit_bias: token 777777777777777777... (5000 digits) is in no vocabulary"


def test_an_integer_the_grammar_engine_crashes_on_is_refused_in_every_form():
    """`{"const": -9223372036854775807}` (a const or enum integer within 512 of -2^63) made llguidance crash the
    whole process with a segmentation fault: any request or batch line with it took the server down. Run in a
    child process, so that the crash on the old sources fails this test rather than the test run."""
    import subprocess

    probe = """
import json
from gptcli import constraints
from gptcli.config import OutputConstraint
from gptcli.errors import ConfigError
for where, make in [
    ("schema", lambda: constraints.schema_constraint({"const": -9223372036854775807}, "schema")),
    ("enum", lambda: constraints.schema_constraint({"properties": {"a": {"enum": [-2**63, "x"]}}}, "enum")),
    ("lark", lambda: constraints.check(OutputConstraint("grammar", 'start: %json {"const": -2**63}'), "lark")),
]:
    try:
        make()
        print(where, "accepted")
    except ConfigError as exc:
        print(exc.message)
print(constraints.schema_constraint({"const": -9223372036854775295}, "near").kind)
"""
    probe = probe.replace("-2**63", "-9223372036854775808")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, f"the child died ({run.returncode}): {run.stderr[-500:]}"
    lines = run.stdout.splitlines()
    for where, line in zip(("schema", "enum", "lark"), lines, strict=False):
        assert line.startswith(f"{where}: ") and "too close to -2^63 for the grammar engine" in line, line
    assert lines[3] == "json_schema"  # 512 above -2^63 compiles, as before
