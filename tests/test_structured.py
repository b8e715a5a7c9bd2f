"""Structured output: JSON Schema, any JSON and regex constraints as token masks in the decoding loop."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import numpy as np
import pytest

from gptcli import constraints, output_requests
from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.config import OutputConstraint, SamplingConfig
from gptcli.decoding import Finished, Token
from gptcli.engine import Engine, EngineLimits, generate, run_all
from gptcli.errors import ConfigError, UsageError
from gptcli.tokenizer import Tokenizer
from tests.conftest import reads, run_cli

CPU32 = LoadOptions(device="cpu", dtype="float32")
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.95, min_p=0.0, max_tokens=80, repetition_stop=False)
SAMPLES = 50

# Small, bounded schemas (short keys, bounded numbers and strings): a random model cannot write forever
# inside them, so every reply completes well within max_tokens and the model's small context.
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "n": {"type": "string", "maxLength": 3},
            "p": {
                "type": "object",
                "properties": {"c": {"enum": ["Paris", "Rome"]}, "z": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["c", "z"],
                "additionalProperties": False,
            },
        },
        "required": ["n", "p"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 99},
        "minItems": 1,
        "maxItems": 3,
    },
    "enum_and_bounds": {
        "type": "object",
        "properties": {
            "c": {"enum": ["red", "green", "blue"]},
            "s": {"type": "number", "minimum": 0, "maximum": 1},
            "ok": {"type": "boolean"},
            "r": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["c", "s", "ok", "r"],
        "additionalProperties": False,
    },
}
REGEXES = [
    r"[A-Z]{1,2}[0-9][0-9A-Z]? [0-9][A-Z]{2}",
    r"(yes|no)",
    r"-?[0-9]{1,4}\.[0-9]{2}",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)",
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tiny_models):
    folder = tiny_models[request.param]
    return TorchBackend.load(folder, CPU32), Tokenizer(folder)


@pytest.fixture(scope="module")
def llama(tiny_models):
    return TorchBackend.load(tiny_models["llama"], CPU32), Tokenizer(tiny_models["llama"])


def _final(events) -> Finished:
    return next(e for e in events if isinstance(e, Finished))


def _run_together(backend, tok, prompt: str, params: list[SamplingConfig]) -> list[Finished]:
    """One reply per params, all decoded together through the engine."""
    ids = tok.encode(prompt)
    engine = Engine(backend, tok, EngineLimits(max_running=64))
    done = {i: e for i, e in run_all(engine, [(ids, p) for p in params]) if isinstance(e, Finished)}
    return [done[i] for i in range(len(params))]


@pytest.mark.slow
def test_fifty_sampled_replies_per_schema_all_validate(llama):
    backend, tok = llama
    names = sorted(SCHEMAS)
    params = [
        replace(SAMPLED, seed=seed, constraint=constraints.schema_constraint(SCHEMAS[name], name))
        for name in names
        for seed in range(SAMPLES)
    ]
    replies = _run_together(backend, tok, "Once upon a time", params)
    for i, name in enumerate(names):
        mine = replies[i * SAMPLES : (i + 1) * SAMPLES]
        assert {r.reason for r in mine} == {"stop"}, name
        for reply in mine:
            jsonschema.validate(json.loads(reply.text), SCHEMAS[name])
        assert len({r.text for r in mine}) > 10, name  # sampling still samples: the replies differ


def test_an_object_that_names_its_properties_takes_no_others(llama):
    """llguidance reads an object without additionalProperties as open, so the default model added keys of its
    own ("avatar" beside "name"); llama.cpp, xgrammar and outlines close it, and so does gptcli now."""
    backend, tok = llama
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    opened = {**schema, "additionalProperties": {"type": "integer"}}
    params = [
        replace(SAMPLED, seed=seed, constraint=constraints.schema_constraint(s, "t"), max_tokens=40)
        for s in (schema, opened)
        for seed in range(12)
    ]
    replies = _run_together(backend, tok, "Once upon a time", params)
    closed, open_ = replies[:12], replies[12:]
    assert all(set(json.loads(r.text)) <= {"a"} for r in closed if r.reason == "stop")
    assert any(r.reason == "stop" for r in closed)
    assert any(set(json.loads(r.text)) - {"a"} for r in open_ if r.reason == "stop")  # said open: open


def test_any_json_replies_parse(llama):
    backend, tok = llama
    params = replace(SAMPLED, constraint=constraints.ANY_JSON, max_tokens=60)
    replies = _run_together(backend, tok, "The capital of France is", [replace(params, seed=i) for i in range(10)])
    complete = [r for r in replies if r.reason == "stop"]
    assert complete, "no reply completed"
    for reply in complete:
        json.loads(reply.text)


def test_sampled_replies_all_match_the_regex(llama):
    backend, tok = llama
    n = 10
    params = [
        replace(SAMPLED, seed=seed, max_tokens=40, constraint=constraints.regex(pattern))
        for pattern in REGEXES
        for seed in range(n)
    ]
    replies = _run_together(backend, tok, "A code:", params)
    for i, pattern in enumerate(REGEXES):
        mine = replies[i * n : (i + 1) * n]
        assert {r.reason for r in mine} == {"stop"}, pattern
        for reply in mine:
            assert re.fullmatch(pattern, reply.text), (pattern, reply.text)


@pytest.mark.parametrize(
    "sampler",
    [
        {"temperature": 0},
        {"temperature": 1.5, "top_k": 5, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 1.2, "top_p": 0.5, "min_p": 0.0},
        {"temperature": 1.0, "top_p": 1.0, "min_p": 0.2},
        {"temperature": 0.8, "repetition_penalty": 1.5},
    ],
)
def test_every_sampler_respects_the_mask(llama, sampler):
    backend, tok = llama
    pattern = r"[0-9]{3}-(yes|no)"
    params = [replace(SAMPLED, seed=seed, **sampler, constraint=constraints.regex(pattern)) for seed in range(8)]
    for reply in _run_together(backend, tok, "The capital of France is", params):
        assert reply.reason == "stop" and re.fullmatch(pattern, reply.text), (sampler, reply.text)


def _allowed_prefix(constraint: OutputConstraint, tok: Tokenizer, ids: tuple[int, ...], width: int) -> int:
    """How many of `ids` the constraint lets through before it first refuses one."""
    matcher = constraints.open_constraint(constraint, tok)
    for n, token in enumerate(ids):
        if matcher.mask(np.zeros(width, dtype=np.float32)) is None or not matcher.allows(token):
            return n
        matcher.advance(token)
    return len(ids)


def test_greedy_under_a_constraint_is_unconstrained_greedy_while_the_grammar_allows_it(model):
    # A random model soon writes bytes that are not UTF-8, which even `(?s:.*)` refuses: up to that
    # point the masked greedy choice must be exactly the free one.
    backend, tok = model
    greedy = SamplingConfig(temperature=0, max_tokens=30, repetition_stop=False)
    anything = constraints.regex(r"(?s:.*)")
    compared = 0
    for prompt in ["Once upon a time", "The capital of France is", "def add(a, b):", "ROMEO:"]:
        ids = tok.encode(prompt)
        free = _final(generate(backend, tok, ids, greedy))
        held = _final(generate(backend, tok, ids, replace(greedy, constraint=anything)))
        n = _allowed_prefix(anything, tok, free.token_ids, backend.info.vocab_size)
        assert held.token_ids[:n] == free.token_ids[:n]
        if n < len(free.token_ids):
            assert held.token_ids[n] != free.token_ids[n]
        compared += n
    assert compared >= 4


def test_batched_sequences_each_keep_their_own_constraint(llama):
    backend, tok = llama
    ids = tok.encode("Once upon a time")
    kinds = [
        (constraints.regex(r"(yes|no)"), lambda t: re.fullmatch(r"(yes|no)", t)),
        (
            constraints.schema_constraint(SCHEMAS["array"], "t"),
            lambda t: jsonschema.validate(json.loads(t), SCHEMAS["array"]) or True,
        ),
        (None, lambda t: True),
        (constraints.regex(r"[0-9]{3}"), lambda t: re.fullmatch(r"[0-9]{3}", t)),
    ]
    requests = [(ids, replace(SAMPLED, seed=i, constraint=kinds[i % 4][0])) for i in range(12)]
    engine = Engine(backend, tok, EngineLimits(max_running=12))
    done = {i: e for i, e in run_all(engine, requests) if isinstance(e, Finished)}
    for i in range(12):
        assert kinds[i % 4][1](done[i].text), (i, done[i].text)


def test_running_out_of_tokens_mid_object_is_length_with_the_partial_text(model):
    backend, tok = model
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    params = replace(SAMPLED, seed=1, max_tokens=5, constraint=constraints.schema_constraint(schema, "t"))
    events = list(generate(backend, tok, tok.encode("Once"), params))
    finished = events[-1]
    assert finished.reason == "length" and len(finished.token_ids) == 5
    assert finished.text == "".join(e.text for e in events if isinstance(e, Token))
    assert finished.text.startswith('{"a')
    with pytest.raises(ValueError):
        json.loads(finished.text)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array", "uniqueItems": True}, "test: JSON Schema keyword not supported: uniqueItems"),
        ({"not": {"type": "string"}}, "test: JSON Schema keyword not supported: not"),
        ({"type": "strin"}, "test: invalid JSON Schema: Invalid type: strin"),
        ({"required": "name"}, "test: invalid JSON Schema: Expected array for 'required', got \"name\""),
        ([1, 2], "test: a JSON Schema must be a JSON object, not an array"),
        (None, "test: a JSON Schema must be a JSON object, not null"),
        (
            {"oneOf": [{"type": "integer"}, {"type": "number"}]},  # it said to enable an llguidance option
            "test: JSON Schema keyword not supported: oneOf whose choices overlap (use anyOf, or make them exclusive)",
        ),
        (  # QA: clamped to 2**63 - 1, which then passed for a match (finish_reason "stop")
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10**20, "maximum": 10**20 + 5}}},
            f"test: minimum {10**20} is past the 64-bit integers structured output can enforce (-2**63 to 2**63 - 1)",
        ),
        (
            {"type": ["integer", "null"], "exclusiveMaximum": 1e20},
            "test: exclusiveMaximum 1e+20 is past the 64-bit integers structured output can enforce"
            " (-2**63 to 2**63 - 1)",
        ),
    ],
)
def test_a_bad_schema_is_a_config_error_naming_the_problem(schema, message):
    with pytest.raises(ConfigError) as info:
        constraints.schema_constraint(schema, "test")
    assert str(info.value) == message and "\n" not in str(info.value)


def test_integer_bounds_within_64_bits_and_properties_named_as_bounds_are_kept():
    constraints.schema_constraint({"type": "integer", "minimum": -(2**62), "maximum": 2**63 - 1}, "test")
    constraints.schema_constraint({"type": "object", "properties": {"minimum": {"type": "integer"}}}, "test")


def test_a_bad_regex_and_conflicting_flags_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^--regex: invalid regex '\(': unclosed group$"):
        constraints.regex("(")
    with pytest.raises(ConfigError) as info:  # QA: all 601 characters quoted, with the syntax hint
        constraints.regex("(" * 300 + "a" + ")" * 300)
    assert str(info.value) == (
        f"--regex: invalid regex '{'(' * 160}... (441 characters more)': exceed the maximum number of nested"
        " parentheses/brackets (250)"
    )
    assert info.value.hint.startswith("make the pattern smaller")
    with pytest.raises(ConfigError, match=r"^--regex: the pattern is not valid UTF-8 text$"):  # a non-UTF-8 argv
        constraints.regex("a\udcff")  # was the codec's "can't encode character '\udcff' ... surrogates not allowed"
    with pytest.raises(UsageError, match="--format and --regex cannot be used together"):
        output_requests.from_flags(None, "json", "[a-z]")
    with pytest.raises(UsageError, match="unknown format 'yaml'"):
        output_requests.from_flags(None, "yaml", None)
    assert output_requests.from_flags(None, "text", None) is None
    assert output_requests.from_flags(None, "json", None) == OutputConstraint("json")
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(schema))}: not valid JSON"):
        output_requests.from_flags(schema, None, None)
    schema.write_text('{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(schema))}: nested too deeply"):  # was RecursionError
        output_requests.from_flags(schema, None, None)


def test_the_deepest_schema_allowed_compiles_and_one_level_deeper_is_the_nesting_error():
    from gptcli.schema_width import MAX_DEPTH

    def nested(depth: int) -> dict:
        schema: dict = {"type": "string"}
        for _ in range(depth - 1):
            schema = {"type": "array", "items": schema}
        return schema

    assert reads(
        constraints.schema_constraint(nested(MAX_DEPTH), "s.json"), "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    )
    # One level more was llguidance's "invalid JSON Schema: recursion limit exceeded at line 1 column 3026" up to 128.
    for depth in (MAX_DEPTH + 1, 128):
        with pytest.raises(ConfigError, match=rf"^s.json: nested too deeply .*over {MAX_DEPTH} arrays and objects"):
            constraints.schema_constraint(nested(depth), "s.json")


def test_cli_bad_schema_exits_3_with_one_line(tiny_models, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "uniqueItems": True}), encoding="utf-8")
    result = run_cli("generate", "hi", "-m", str(tiny_models["gpt2"]), "--json-schema", str(schema))
    assert result.returncode == 3
    lines = result.stderr.decode().strip().splitlines()
    assert lines[0] == f"error: {schema}: JSON Schema keyword not supported: uniqueItems"
    assert "Traceback" not in result.stderr.decode() and result.stdout == b""
    both = run_cli("generate", "hi", "-m", str(tiny_models["gpt2"]), "--format", "json", "--regex", "a")
    assert both.returncode == 2 and "cannot be used together" in both.stderr.decode()


def test_cli_generate_and_batch_follow_the_constraint(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    pattern = r"[A-Z]{1,2}[0-9] [0-9][A-Z]{2}"
    out = run_cli("generate", "A UK postcode:", "-m", model, "--regex", pattern, "-t", "0.8", "--seed", "3")
    assert out.returncode == 0, out.stderr.decode()
    assert re.fullmatch(pattern, out.stdout.decode().rstrip("\n"))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["array"]), encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"Row {i}"}) + "\n" for i in range(4)), encoding="utf-8"
    )
    results = tmp_path / "out.jsonl"
    batch = run_cli("generate", "--batch", str(rows), "-m", model, "--json-schema", str(schema), "-o", str(results))
    assert batch.returncode == 0, batch.stderr.decode()
    lines = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4
    for line in lines:
        jsonschema.validate(json.loads(line["text"]), SCHEMAS["array"])


def test_cli_chat_constrains_every_reply(tiny_models):
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "--regex", "(yes|no)", "-t", "0.9", input="hi\nagain\n")
    assert result.returncode == 0, result.stderr.decode()
    replies = result.stdout.decode().splitlines()
    assert len(replies) == 2 and all(reply in {"yes", "no"} for reply in replies), replies


GRACE = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smollm(default_model):
    return TorchBackend.load(default_model.path, CPU32), Tokenizer(default_model.path)


def _chat_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(tok.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_writes_the_grace_hopper_json(smollm):
    backend, tok = smollm
    ids = _chat_ids(tok, "Return a JSON object with the keys name and age for Grace Hopper, born 1906.")
    params = SamplingConfig(temperature=0, max_tokens=60, constraint=constraints.schema_constraint(GRACE, "t"))
    finished = _final(generate(backend, tok, ids, params))
    assert finished.reason == "stop"
    data = json.loads(finished.text)
    jsonschema.validate(data, GRACE)
    assert "Grace" in data["name"]


@pytest.mark.integration
@pytest.mark.slow
def test_default_model_greedy_under_an_anything_regex_equals_free_greedy(smollm):
    backend, tok = smollm
    greedy = SamplingConfig(temperature=0, max_tokens=12)
    ids = _chat_ids(tok, "Write one sentence about the sea.")
    free = _final(generate(backend, tok, ids, greedy))
    held = _final(generate(backend, tok, ids, replace(greedy, constraint=constraints.regex(r"(?s:.*)"))))
    assert held.token_ids == free.token_ids and held.text == free.text and len(free.token_ids) > 5


@pytest.fixture(scope="module")
def server(tiny_models):
    pytest.importorskip("fastapi")
    from gptcli.config import Settings
    from gptcli.runtime import open_runtime
    from tests.test_server import serve_runtime

    runtime = open_runtime(Settings(model=str(tiny_models["llama"])), lambda message: None)
    with serve_runtime(runtime, max_running=8) as live:
        yield live


def test_server_response_format_json_schema_and_json_object(server):
    httpx = pytest.importorskip("httpx")
    url = server.v1 + "/chat/completions"
    schema = SCHEMAS["nested"]
    base = {"messages": [{"role": "user", "content": "Who?"}], "temperature": 0.9, "max_tokens": 60}
    formatted = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    for seed in range(3):
        reply = httpx.post(url, json={**base, "seed": seed, "response_format": formatted}, timeout=60).json()
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    streamed = httpx.post(url, json={**base, "seed": 7, "stream": True, "response_format": formatted}, timeout=60)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), schema)
    text_url = server.v1 + "/completions"
    array = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS["array"]}}
    done = httpx.post(text_url, json={"prompt": "x", "max_tokens": 40, "response_format": array}, timeout=60).json()
    jsonschema.validate(json.loads(done["choices"][0]["text"]), SCHEMAS["array"])
    obj = {**base, "seed": 1, "max_tokens": 80, "response_format": {"type": "json_object"}}
    content = httpx.post(url, json=obj, timeout=60).json()["choices"][0]["message"]["content"]
    assert content.startswith("{")
    plain = {**base, "temperature": 0, "response_format": {"type": "text"}}
    assert (
        httpx.post(url, json=plain, timeout=60).json()["choices"][0]["message"]["content"]
        == (httpx.post(url, json={**base, "temperature": 0}, timeout=60).json()["choices"][0]["message"]["content"])
    )


def test_server_bad_schema_is_400_in_openai_shape(server):
    httpx = pytest.importorskip("httpx")
    url = server.v1 + "/chat/completions"
    base = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
            "response_format.json_schema.schema: JSON Schema keyword not supported: uniqueItems",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema: required"),
        ({"type": "yaml"}, "response_format.type"),
    ]
    for response_format, message in cases:
        response = httpx.post(url, json={**base, "response_format": response_format}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith("response_format")
        assert error["message"].startswith(message), error


MISMATCHED_FORMATS = [  # OpenAI's shape: text | json_object | json_schema with json_schema: {name, schema, strict}
    ({"type": "json_object", "json_schema": {"name": "x", "schema": SCHEMAS["array"]}}, "response_format.json_schema"),
    ({"type": "text", "json_schema": {"name": "x", "schema": SCHEMAS["array"]}}, "response_format.json_schema"),
    ({"type": "text", "schema": SCHEMAS["array"]}, "response_format.schema"),  # llama-server's place, not for text
    ({"type": "json_schema", "schema": {}, "json_schema": {"schema": {}}}, "response_format.schema"),  # given twice
    ({"type": "json_object", "schema": "an array"}, "response_format.schema"),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "type": "object"}},
        "response_format.json_schema.type",
    ),
    ({"type": "json_schema", "json_schema": {"type": "object"}}, "response_format.json_schema.schema"),  # inline
]


def test_a_response_format_whose_fields_do_not_fit_its_type_is_a_400_naming_the_field(server):
    """`json_schema` beside type json_object (or a schema at the wrong level) was silently ignored: the
    client believed its schema held while the reply was any JSON object, or free text."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    for response_format, param in MISMATCHED_FORMATS:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny-llama", messages=messages, max_tokens=4, response_format=response_format
            )
        assert caught.value.param == param and f"400 - {param}: " in caught.value.message, caught.value.message
        body = {"prompt": "hi", "max_tokens": 4, "response_format": response_format, "stream": True}
        response = httpx.post(server.v1 + "/completions", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    fits = {"type": "json_object", "json_schema": None}  # a null field counts as not given
    reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=4, response_format=fits)
    assert reply.choices[0].message.content.startswith("{")


def test_llama_servers_schema_beside_the_type_constrains_the_reply(server, tiny_models, tmp_path):
    """llama-server takes `{"type": "json_object", "schema": {...}}` (and the same with json_schema): clients
    written for it get their schema here too, on the server and in batch lines, not a 400."""
    httpx = pytest.importorskip("httpx")
    forms = [{"type": kind, "schema": SCHEMAS["array"]} for kind in ("json_object", "json_schema")]
    for form in forms:
        body = {"prompt": "x", "max_tokens": 40, "response_format": form}
        done = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()
        jsonschema.validate(json.loads(done["choices"][0]["text"]), SCHEMAS["array"])
    wrong = {"type": "json_object", "schema": {"$ref": "#"}}
    refused = httpx.post(server.v1 + "/completions", json={"prompt": "x", "response_format": wrong}, timeout=30)
    assert refused.status_code == 400 and "matches no text" in refused.json()["error"]["message"], refused.text
    assert refused.json()["error"]["param"] == "response_format.schema"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "x", "response_format": f}) + "\n" for f in forms), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = run_cli("generate", "--batch", str(rows), "-m", str(tiny_models["llama"]), "-n", "40", "-o", str(out))
    assert run.returncode == 0, run.stderr.decode()
    for line in out.read_text(encoding="utf-8").splitlines():
        jsonschema.validate(json.loads(json.loads(line)["text"]), SCHEMAS["array"])


def test_a_batch_lines_response_format_follows_the_same_shape(tiny_models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    lines = [{"id": f"r{i}", "prompt": "hi", "response_format": f} for i, (f, _) in enumerate(MISMATCHED_FORMATS)]
    rows.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = run_cli("generate", "--batch", str(rows), "-m", str(tiny_models["llama"]), "-n", "4", "-o", str(out))
    assert run.returncode == 6, run.stderr.decode()  # every line failed, each with its own error result
    got = [json.loads(text)["error"]["message"] for text in out.read_text(encoding="utf-8").splitlines()]
    expected = [param.replace("response_format", "the line's `response_format`", 1) for _, param in MISMATCHED_FORMATS]
    assert [message.split(": ")[0] for message in got] == expected, got


def test_a_grammar_that_matches_nothing_or_gives_out_is_an_error_not_a_quiet_empty_reply(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    said = "error: --regex: invalid regex '[^\\s\\S]': it matches no text at all"  # named as the flag's other errors
    nothing = run_cli("generate", "hi", "-m", model, "-n", "4", "--regex", r"[^\s\S]", "--json")
    assert nothing.returncode == 3 and nothing.stdout == b"", nothing.stderr.decode()  # before any decoding
    assert nothing.stderr.decode().startswith(said)
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"id": "a", "prompt": "hi"}\n')
    lines = run_cli("generate", "-m", model, "-n", "4", "--batch", str(batch), "--regex", r"[^\s\S]")
    assert lines.returncode == 3 and lines.stderr.decode().startswith(said)  # every line would fail alike


def test_server_schema_that_matches_nothing_is_a_400(server):
    httpx = pytest.importorskip("httpx")
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
    }
    # The schema's place, as a keyword it cannot enforce names it (it named response_format).
    where = "response_format.json_schema.schema"
    response = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == where, response.text
    assert response.json()["error"]["message"] == f"{where}: invalid JSON Schema: it matches no text at all"
    streamed = httpx.post(server.v1 + "/chat/completions", json={**body, "stream": True}, timeout=30)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == where  # before any event
    text_format = {"type": "json_schema", "name": "x", "schema": {"$ref": "#"}}
    responses = httpx.post(server.v1 + "/responses", json={"input": "hi", "text": {"format": text_format}}, timeout=30)
    assert responses.status_code == 400 and responses.json()["error"]["param"] == "text.format.schema", responses.text


def test_the_compiled_grammar_cache_is_bounded_by_the_size_of_its_schemas(tiny_models, monkeypatch):
    from gptcli import constraints
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    monkeypatch.setattr(constraints, "MAX_GRAMMAR_SOURCE", 100)
    first, second = constraints.regex("a" * 60 + "[0-9]+"), constraints.regex("b" * 60 + "[0-9]+")
    constraints.prepare(first, tok)
    constraints.prepare(second, tok)
    bridge = constraints._BRIDGES[tok]
    assert list(bridge.matchers) == [second] and bridge.source_bytes == len(second.source)
    assert constraints.open_constraint(first, tok) is not None  # compiled again when asked for again


def test_a_grammar_that_gives_out_after_its_first_mask_is_refused_before_decoding(tiny_models):
    """`a{1000000}` passes one mask, then its lexer is out of expressions for every later sequence."""
    import numpy as np

    from gptcli import constraints
    from gptcli.errors import ConfigError
    from gptcli.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["llama"])
    with pytest.raises(ConfigError, match=r"invalid regex 'a\{1000000\}': lexer error: too many expressions"):
        constraints.prepare(constraints.regex("a{1000000}"), tok)
    fine = constraints.regex("a{3}")
    constraints.prepare(fine, tok)
    for _ in range(3):  # a grammar that passes works for every sequence
        assert constraints.open_constraint(fine, tok).mask(np.zeros(tok.vocab_size, dtype=np.float32)) is not None


def test_a_stop_string_never_cuts_a_structured_output_short_of_a_match(llama, tiny_models):
    """A stop string inside the match gave `{"a` with finish_reason "stop" (which is to mean a whole match)."""
    from gptcli.batch_requests import parse_request
    from gptcli.config import Settings
    from gptcli.remote import RemoteModel

    backend, tok = llama
    pattern = r"abc-(yes|no)"
    for seed in range(3):
        params = replace(SAMPLED, seed=seed, stop=("b", "-"), constraint=constraints.regex(pattern))
        finished = _final(generate(backend, tok, tok.encode("A code:"), params))
        assert finished.reason == "stop" and re.fullmatch(pattern, finished.text), finished.text
    constrained = replace(SAMPLED, stop=("}",), constraint=constraints.ANY_JSON)
    assert "stop" not in RemoteModel("http://127.0.0.1:9/v1", model="m")._sampling(constrained)  # --url
    settings = replace(Settings(), sampling=replace(SAMPLED, constraint=constraints.ANY_JSON))
    line = parse_request(1, b'{"prompt": "hi", "stop": ["}"]}', tok, settings, 128)
    assert line.error == "`stop` does not go with structured output: the reply ends where its grammar does"
    chat = run_cli(
        "chat", "-m", str(tiny_models["llama"]), "--format", "json", "--stop", "}", "-n", "8", input="/set stop x\n"
    )
    said = chat.stderr.decode()
    assert chat.returncode == 0, said
    assert "warning: stop strings are ignored with structured output" in said
    assert "error: /set stop: stop strings do not go with structured output" in said


def test_server_applies_no_stop_strings_to_a_json_response_format(server):
    """A stop string cut the JSON short of a match (and said finish_reason stop); clients send `stop` routinely,
    so it is accepted and not applied, rather than refused."""
    httpx = pytest.importorskip("httpx")
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}}, "required": ["a"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "stop": ['"']}
    for response_format in ({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},):
        response = httpx.post(server.v1 + "/chat/completions", json={**body, "response_format": response_format})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert json.loads(choice["message"]["content"]) == {"a": "x"} and choice["finish_reason"] == "stop"
    text = httpx.post(server.v1 + "/chat/completions", json={**body, "response_format": {"type": "text"}}, timeout=30)
    assert text.status_code == 200 and '"' not in text.json()["choices"][0]["message"]["content"]


def test_cli_says_when_max_tokens_cut_the_json_short(tiny_models, tmp_path):
    """`{"a":` on stdout with exit 0 and not a word on stderr: a script only found out when its parser failed."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))
    cut = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "--json-schema", str(schema), "-n", "4")
    assert cut.returncode == 0 and cut.stdout.decode().startswith('{"a')
    said = "warning: the output was cut at --max-tokens (4) before the JSON was complete: it does not parse"
    assert said in cut.stderr.decode()
    whole = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "--regex", "(yes|no)", "-n", "8")
    assert whole.returncode == 0 and whole.stdout.decode().strip() in {"yes", "no"}
    assert "warning" not in whole.stderr.decode()


def test_cli_says_when_a_cut_json_still_parses(capsys):
    """`1.1331428571818` cut as a loop parses, so the warning (given only when json.loads failed) never came."""
    from types import SimpleNamespace

    from gptcli.cli import render

    sampling = SimpleNamespace(constraint=constraints.ANY_JSON, max_tokens=64)
    render.warn_if_incomplete(SimpleNamespace(reason="repetition", text="1.1331428571818"), sampling)
    said = capsys.readouterr().err
    assert "the output was cut as a loop" in said and "it parses, but may be missing its end" in said
    render.warn_if_incomplete(SimpleNamespace(reason="stop", text="1.5"), sampling)
    assert capsys.readouterr().err == ""


def test_ignore_eos_keeps_a_constrained_reply_going_while_its_grammar_can(llama):
    """ignore_eos (the server's benchmark switch) ended `(ab)+` at `ab`: the grammar let EOS through."""
    backend, tok = llama
    pairs = SamplingConfig(temperature=0, max_tokens=12, ignore_eos=True, repetition_stop=False)
    for prompt in ["Once upon a time", "hi", "A code:"]:
        finished = _final(
            generate(backend, tok, tok.encode(prompt), replace(pairs, constraint=constraints.regex("(ab)+")))
        )
        assert finished.reason == "length" and finished.text == "ab" * 6, finished
    params = replace(SAMPLED, ignore_eos=True, constraint=constraints.schema_constraint({"enum": ["yes"]}, "t"))
    finished = _final(generate(backend, tok, tok.encode("Once"), params))  # a whole match still ends it
    assert finished.reason == "stop" and finished.text == '"yes"'


def test_a_schema_with_a_key_twice_or_a_nan_is_refused_by_name(tmp_path):
    """`{"type": "integer", ..., "type": "string"}` ran as a string schema (json.loads kept the last quietly);
    a NaN or 1e999 came back as llguidance's 'expected value at line 1 column 32' of text the user never wrote."""
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "integer", "properties": {"a": {}, "a": {}}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(schema))}: the key 'a' is given twice in one object$"):
        output_requests.from_flags(schema, None, None)
    for number in ("NaN", "-Infinity", "1e999"):
        schema.write_text('{"type": "number", "maximum": ' + number + "}", encoding="utf-8")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(schema))}: NaN and Infinity are not JSON numbers$"):
            output_requests.from_flags(schema, None, None)
    with pytest.raises(ConfigError, match=r"^body: NaN and Infinity are not JSON numbers$"):  # the server's way in
        constraints.schema_constraint({"enum": [float("nan")]}, "body")


def test_a_repetition_the_grammar_forces_is_not_cut_as_a_loop(llama):
    """`(ab){40}` (or an array of 30 `true`s) was cut as "repetition" at 48 tokens: the model had no choice."""
    backend, tok = llama
    greedy = SamplingConfig(temperature=0, max_tokens=100)  # the repetition stop on, as by default
    ids = tok.encode("hi")
    forced = _final(generate(backend, tok, ids, replace(greedy, constraint=constraints.regex("(ab){40}"))))
    assert forced.reason == "stop" and forced.text == "ab" * 40, forced
    free = _final(generate(backend, tok, ids, replace(greedy, constraint=constraints.regex("(ab)+c"))))
    assert free.reason == "repetition", free  # a loop the model chose is still one


def test_a_batch_line_sets_its_own_response_format(tiny_models, tmp_path):
    """OpenAI's batch lines carry `response_format`: it was "unknown key", so one run could have one schema only."""

    def line(i: int, response_format: object) -> str:
        return json.dumps({"id": f"r{i}", "prompt": f"Row {i}", "max_tokens": 60, "response_format": response_format})

    formats = [
        {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMAS["array"], "strict": True}},
        {"type": "json_schema", "json_schema": {"schema": SCHEMAS["enum_and_bounds"]}},
        {"type": "json_object"},
        {"type": "text"},  # over the run's --regex: free text
        {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True}}},
        {"type": "yaml"},
    ]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(line(i, f) + "\n" for i, f in enumerate(formats)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    model = str(tiny_models["llama"])
    result = run_cli("generate", "--batch", str(rows), "-m", model, "--regex", "[0-9]{3}", "-o", str(out), "-t", "0")
    assert result.returncode == 0, result.stderr.decode()
    got = [json.loads(text) for text in out.read_text(encoding="utf-8").splitlines()]
    jsonschema.validate(json.loads(got[0]["text"]), SCHEMAS["array"])
    jsonschema.validate(json.loads(got[1]["text"]), SCHEMAS["enum_and_bounds"])
    assert isinstance(json.loads(got[2]["text"]), dict)
    assert got[3]["finish_reason"] == "length" and not re.fullmatch("[0-9]{3}", got[3]["text"])
    assert got[4]["error"]["message"] == (
        "the line's `response_format`.json_schema.schema: JSON Schema keyword not supported: uniqueItems"
    )
    assert got[5]["error"]["message"].startswith("the line's `response_format`.type: must be text, json_object or")


WIDE_OBJECT = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(1000)}}
HALF_WIDE = [{"type": "object", "properties": {f"{side}{i}": {"type": "integer"} for i in range(300)}} for side in "ab"]
TREE = {"type": "object", "properties": {**HALF_WIDE[0]["properties"], "child": {"$ref": "#"}}}
PARTS_REFS = [{"$ref": "#/parts/a"}, {"$ref": "#/parts/b"}]
PARTS = {"a": HALF_WIDE[0], "b": HALF_WIDE[1]}
ANCHORED = {side: {**half, "$anchor": side} for side, half in PARTS.items()}
SAID_WIDE = (
    r"too many choices open at one point \((\d+) items, at most 2000\){}: give fewer optional properties or choices"
)


def test_an_object_with_too_many_optional_properties_is_refused_before_decoding(llama):
    """1000 optional properties passed every check, then the first `{` failed mid-reply with llguidance's
    'Parser Error: Current row has 4007 items; max is 2000; consider making your grammar left-recursive'."""
    _, tok = llama
    said = SAID_WIDE.format("").replace(r"(\d+)", "3999")
    with pytest.raises(ConfigError, match=f"^t: {said}$"):
        constraints.schema_constraint(WIDE_OBJECT, "t")
    with pytest.raises(ConfigError, match=f"^{said}$"):  # the first-mask check says the same
        constraints.prepare(OutputConstraint("json_schema", json.dumps(WIDE_OBJECT)), tok)


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "array", "items": WIDE_OBJECT}, "/items"),
        ({"type": "object", "properties": {"rows": {"type": "array", "items": WIDE_OBJECT}}}, "/properties/rows/items"),
        ({"$defs": {"row": WIDE_OBJECT}, "type": "array", "items": {"$ref": "#/$defs/row"}}, "/$defs/row"),
        ({"type": "object", "additionalProperties": WIDE_OBJECT}, "/additionalProperties"),
        ({"anyOf": [{"type": "string"}, {"type": "array", "items": WIDE_OBJECT}]}, "/anyOf/1/items"),
        ({"type": "array", "items": {"anyOf": HALF_WIDE}}, "/items"),  # 300 + 300 keys open at one `{`
        ({"type": "array", "items": {"allOf": HALF_WIDE}}, "/items"),
        ({"type": "object", "properties": {"enum": WIDE_OBJECT}}, "/properties/enum"),  # a property's name
        ({**WIDE_OBJECT, "required": ["k999"]}, ""),  # 999 optional keys before the required one
        # Merged through `$ref`s outside $defs, or to `$anchor`s: the probe could not compile them alone
        # and skipped them, and every reply failed at its first `{`.
        ({"parts": PARTS, "type": "array", "items": {"allOf": PARTS_REFS}}, "/items"),
        ({"$defs": ANCHORED, "type": "array", "items": {"allOf": [{"$ref": "#a"}, {"$ref": "#b"}]}}, "/items"),
    ],
)
def test_a_wide_object_anywhere_in_a_schema_is_refused_before_any_token(schema, where):
    """The up-front check reached only the top level: an array of 1000-property objects passed it, then
    every reply failed at its first `{` (generate exited 3 mid-reply, the server sent a 200 stream that
    ended in an error event)."""
    place = f" in the object at {re.escape(where)}" if where else ""
    with pytest.raises(ConfigError, match=f"^t: {SAID_WIDE.format(place)}$"):
        constraints.schema_constraint(schema, "t")


@pytest.mark.parametrize(
    "schema",
    [
        {**WIDE_OBJECT, "required": list(WIDE_OBJECT["properties"])},  # one choice at a time
        {**WIDE_OBJECT, "required": [f"k{i}" for i in range(0, 1000, 300)]},  # runs of 299 optional keys
        {"type": "array", "items": {"anyOf": [HALF_WIDE[0], {"type": "string"}]}},
        {"parts": {"a": HALF_WIDE[0]}, "type": "array", "items": {"anyOf": [PARTS_REFS[0], {"type": "string"}]}},
        {"$defs": {"node": TREE}, "$ref": "#/$defs/node"},  # a recursive `$ref`, copied into the probe once
    ],
)
def test_many_properties_in_runs_llguidance_can_open_still_pass(schema):
    constraints.schema_constraint(schema, "t")  # no error: these replies can be written


def test_a_schema_over_llguidances_size_limit_says_so_in_our_words():
    """'invalid JSON Schema: schema too large' (llguidance's words) named neither the limit nor the fix."""
    keys = [f"k{i}" for i in range(17_000)]  # three subschemas each: over the 50,000 llguidance compiles
    huge = {"type": "object", "properties": {key: {"type": "string"} for key in keys}, "required": keys}
    said = "t: the JSON Schema is too large to compile (over 50,000 subschemas): make it smaller or split it"
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        constraints.schema_constraint(huge, "t")


def test_cli_and_server_refuse_a_nested_wide_object_before_generating(tiny_models, tmp_path, server):
    httpx = pytest.importorskip("httpx")
    rows = {"type": "array", "items": WIDE_OBJECT}
    schema = tmp_path / "rows.json"
    schema.write_text(json.dumps(rows), encoding="utf-8")
    run = run_cli("generate", "hi", "-m", str(tiny_models["llama"]), "-n", "8", "--json-schema", str(schema))
    said = run.stderr.decode()
    assert run.returncode == 3 and run.stdout == b"", said
    assert said.splitlines()[0] == (
        f"error: {schema}: too many choices open at one point (3999 items, at most 2000) in the object at /items: "
        "give fewer optional properties or choices"
    )
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "rows", "schema": rows}},
    }
    for stream in (False, True):
        response = httpx.post(server.v1 + "/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format.json_schema.schema" and "in the object at /items" in error["message"]


class _RowOverflowAfterOneToken:
    """llguidance's matcher that meets a row too wide at the reply's second token (as an object too wide
    for it did when the up-front check could not probe it): nothing the check lets through does that now."""

    def __init__(self, matcher) -> None:
        self._matcher = matcher
        self._consumed = 0

    def __getattr__(self, name: str):
        return getattr(self._matcher, name)

    def consume_token(self, token_id: int) -> bool:
        self._consumed += 1
        return self._consumed == 1 and self._matcher.consume_token(token_id)

    def is_error(self) -> bool:
        return self._consumed > 1 or self._matcher.is_error()

    def get_error(self) -> str:
        return "Parser Error: Current row has 2407 items; max is 2000; consider making your grammar left-recursive"


def test_chat_says_when_its_output_grammar_stopped_a_reply(tiny_models, tmp_path, capsys, monkeypatch):
    """`generate` exits 3 on a reply its grammar could not finish; chat showed the `{` and nothing else."""
    import io

    from gptcli.cli.app import run

    wrapped = constraints.TokenConstraint.__init__

    def overflowing(self, matcher, *args, **kwargs) -> None:
        wrapped(self, _RowOverflowAfterOneToken(matcher), *args, **kwargs)

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}), encoding="utf-8")
    args = ("-m", str(tiny_models["llama"]), "-t", "0", "-n", "8", "--json-schema", str(schema))
    said = "error: the reply stopped: the output grammar failed: too many choices open at one point"
    with monkeypatch.context() as patch:
        patch.setattr(constraints.TokenConstraint, "__init__", overflowing)
        patch.setattr("sys.stdin", io.StringIO("hi\n"))
        assert run(["chat", *args]) == 0  # the chat goes on
        out, err = capsys.readouterr()
        assert out.strip() == "{" and said in err, err
        patch.setattr("sys.stdin", io.StringIO(""))
        assert run(["generate", "hi", *args]) == 3
        out, err = capsys.readouterr()
        assert out.strip() == "{" and said in err, err
    args = ("chat", "-m", str(tiny_models["llama"]), "-t", "0", "-n", "8")
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}))
    short = run_cli(*args[:-1], "2", "--json-schema", str(schema), input="hi\n")  # and a reply cut short
    assert "warning: the output was cut at --max-tokens (2) before the JSON was complete" in short.stderr.decode()
