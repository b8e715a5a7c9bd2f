"""Batch files: per-line errors, input order, per-line settings, resume, interruption."""

import io
import json
import os
import re
import shutil
import threading

import pytest

from gptcli.backends.base import LoadOptions
from gptcli.backends.torch_backend import TorchBackend
from gptcli.batch_requests import parse_request
from gptcli.batchfile import LocalLines, RemoteLines, run_batch
from gptcli.config import Settings, with_sampling
from gptcli.decoding import NO_STATS, Finished, Token
from gptcli.engine import Engine, EngineLimits, generate
from gptcli.errors import InputError
from gptcli.jsonl import MAX_LINE_BYTES, ResultWriter, completed_ids, count_lines, open_results, read_lines
from gptcli.prompts import encode_prompt
from gptcli.tokenizer import Tokenizer
from tests.scripted import ScriptedBackend

CPU32 = LoadOptions(device="cpu", dtype="float32")
SETTINGS = with_sampling(Settings(), temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def model(tiny_models):
    return TorchBackend.load(tiny_models["llama"], CPU32), Tokenizer(tiny_models["llama"])


def _run(model, lines, *, skip=frozenset(), parallel=4, writer_stream=None, **limits):
    backend, tok = model
    stream = writer_stream or io.StringIO()
    data = io.BytesIO("".join(line + "\n" for line in lines).encode())
    requests = (parse_request(n, raw, tok, SETTINGS, backend.info.context_length) for n, raw in read_lines(data))
    engine = Engine(backend, tok, EngineLimits(max_running=parallel, **limits))
    summary = run_batch(LocalLines(engine), requests, ResultWriter(stream, sync=False), skip=set(skip))
    return summary, [json.loads(line) for line in stream.getvalue().splitlines()]


def _alone(model, text, raw=False, **sampling):
    backend, tok = model
    params = with_sampling(SETTINGS, **sampling).sampling
    events = list(generate(backend, tok, encode_prompt(tok, text, raw=raw).ids, params))
    return events[-1]


def test_results_come_in_input_order_with_an_error_per_bad_line(model):
    lines = [
        json.dumps({"id": "a", "prompt": "Once upon a time"}),
        "{not json",
        json.dumps({"prompt": "The capital of France is", "max_tokens": 3}),
        json.dumps({"id": "b", "prompt": "hi", "temprature": 1}),
        json.dumps({"id": "c", "messages": [{"role": "user", "content": "ROMEO: But soft"}]}),
        json.dumps({"id": "d", "prompt": "word " * 400}),
        json.dumps({"id": "a", "prompt": "again"}),
        json.dumps({"id": "e", "prompt": "x", "temperature": -1}),
        json.dumps([1, 2]),
        json.dumps({"id": 3, "prompt": "the id of line 3, which has none"}),
    ]
    summary, results = _run(model, lines)
    assert [r["id"] for r in results] == ["a", "2", "3", "b", "c", "d", "a", "e", "9", "3"]
    assert summary.ok == 3 and summary.failed == 7
    assert results[0]["text"] == _alone(model, "Once upon a time").text
    assert results[2]["text"] == _alone(model, "The capital of France is", max_tokens=3).text
    assert results[2]["usage"]["completion_tokens"] <= 3
    assert results[0]["finish_reason"] in {"stop", "length"}
    assert "not valid JSON" in results[1]["error"]["message"]
    assert "unknown key 'temprature'" in results[3]["error"]["message"]
    assert "context holds" in results[5]["error"]["message"]
    assert "duplicate id 'a'" in results[6]["error"]["message"]
    assert results[7]["error"]["message"].startswith("the line: sampling.temperature must be >= 0, got -")
    assert "JSON object" in results[8]["error"]["message"]
    assert "duplicate id '3' (a line without an id gets its line number" in results[9]["error"]["message"]
    assert "line number" not in results[6]["error"]["message"]


def test_batched_texts_equal_each_prompt_alone(model):
    prompts = ["Once upon a time", "def add(a, b):", "中文测试", "The capital of Italy is", "a b c"]
    _, results = _run(model, [json.dumps({"prompt": p}) for p in prompts], parallel=5)
    assert [r["text"] for r in results] == [_alone(model, p).text for p in prompts]


def test_resume_names_the_results_file_whose_middle_holds_nul_bytes(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_bytes(b'{"id": "r0"}\n\0\0\n{"id": "r1"}\n')
    with pytest.raises(InputError, match=f"^{re.escape(str(out))}: line 2 holds a NUL byte"):
        completed_ids(out)


def test_resume_skips_the_ids_already_written(model, tmp_path):
    out = tmp_path / "results.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": f"line {i}"}) for i in range(5)]
    with out.open("w") as stream:
        stream.write(json.dumps({"id": "r0", "text": "kept"}) + "\n" + json.dumps({"id": "r1", "text": "kept"}) + "\n")
        stream.write('{"id": "r2", "te')  # a torn last line from a killed run
    assert completed_ids(out) == {"r0", "r1"}
    summary, results = _run(model, lines, skip=completed_ids(out))
    assert summary.skipped == 2
    assert [r["id"] for r in results] == ["r2", "r3", "r4"]


@pytest.mark.parametrize(
    ("tail", "done"),
    [
        ('{"id": "r2", "te', {"r0", "r1"}),
        ('{"id": "r2", "text": "whole, only its newline lost"}', {"r0", "r1", "r2"}),
        ("\0" * 4096, {"r0", "r1"}),  # what a crash can leave at a file's end (was: "line 3 holds a NUL byte")
    ],
)
def test_resume_appends_on_a_line_of_its_own(model, tmp_path, tail, done):
    """A torn last line is cut (its request runs again); a whole one keeps its place and gets its newline."""
    out = tmp_path / "not" / "yet" / "results.jsonl"
    with open_results(out, resume=False) as stream:  # the folder is made
        stream.write(json.dumps({"id": "r0", "text": "kept"}) + "\n" + json.dumps({"id": "r1", "text": "kept"}) + "\n")
        stream.write(tail)
    assert completed_ids(out) == done
    lines = [json.dumps({"id": f"r{i}", "prompt": f"line {i}"}) for i in range(4)]
    backend, tok = model
    requests = (
        parse_request(n, raw, tok, SETTINGS, backend.info.context_length)
        for n, raw in read_lines(io.BytesIO("\n".join(lines).encode()))
    )
    with open_results(out, resume=True) as stream:
        run_batch(LocalLines(Engine(backend, tok)), requests, ResultWriter(stream, sync=False), skip=completed_ids(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["r0", "r1", "r2", "r3"]


def test_a_message_role_the_server_would_refuse_is_the_lines_error(model):
    backend, tok = model
    line = json.dumps({"messages": [{"role": "bot", "content": "hi"}]}).encode()
    request = parse_request(1, line, tok, SETTINGS, backend.info.context_length)
    assert request.error is not None and request.error.startswith("unknown message role 'bot' (known: system,")


def test_content_as_a_list_of_text_parts_runs_as_the_server_takes_it(model):
    """OpenAI's batch files and SDKs write a message's content as [{"type": "text", "text": ...}]: the server took
    it (joined a line each) but a batch line was 'each message needs a string `role` and `content`'."""
    backend, tok = model

    def parsed(content):
        line = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()
        return parse_request(1, line, tok, SETTINGS, backend.info.context_length)

    parts = parsed([{"type": "text", "text": "Paris is"}, {"type": "text", "text": "the capital"}])
    assert parts.error is None and parts.prompt_ids == parsed("Paris is\nthe capital").prompt_ids
    image = parsed([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])
    assert image.error == "messages.0: only text content is supported (a string, or a list of text parts)"
    assert parsed([{"type": "text", "text": 3}]).error == "messages.0: each text part needs a string `text`"


def test_messages_the_chat_template_refuses_are_that_lines_error(model, tiny_models, tmp_path):
    """A template's raise_exception (roles out of order; a `tool` result it cannot place) is a 400 in the server,
    and the line's error here: a bad line never stops the run (it ended it: 'chat template error', exit 5). A
    template that fails is the model's fault, and still ends the run (exit 5)."""
    from gptcli.errors import ModelError
    from tests.conftest import CHATML

    folder = tmp_path / "strict"
    shutil.copytree(tiny_models["llama"], folder)
    first = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('a chat starts with the user') }}{% endif %}"
    (folder / "chat_template.jinja").write_text(first + CHATML)
    lines = [
        json.dumps({"id": "bad", "messages": [{"role": "assistant", "content": "hi"}]}),
        json.dumps({"id": "good", "messages": [{"role": "user", "content": "hi"}]}),
    ]
    summary, records = _run((model[0], Tokenizer(folder)), lines)
    assert (
        records[0]["id"] == "bad"
        and "chat template error: a chat starts with the user" in records[0]["error"]["message"]
    )
    assert records[1]["id"] == "good" and "text" in records[1] and (summary.ok, summary.failed) == (1, 1)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ModelError, match="the chat template fails: TypeError"):
        _run((model[0], Tokenizer(folder)), lines)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ({"prompt": "hi", "raw": True, "system": "Be brief."}, "`raw: true` sends the prompt without the chat"),
        ({"messages": [{"role": "user", "content": "hi"}], "system": "Be brief."}, "`system` and `raw` go with"),
        ({"messages": [{"role": "user", "content": "hi"}], "raw": True}, "`system` and `raw` go with `prompt`"),
        ({"prompt": "hi", "raw": "false"}, "`raw` must be true or false"),
        ({"prompt": "hi", "system": 3}, "`system` must be text"),
    ],
)
def test_a_system_or_raw_that_would_be_dropped_is_the_lines_error(model, line, error):
    backend, tok = model
    request = parse_request(1, json.dumps(line).encode(), tok, SETTINGS, backend.info.context_length)
    assert request.error is not None and request.error.startswith(error), request.error


def test_system_and_raw_still_shape_a_prompt(model):
    _, tok = model
    with_system = parse_request(1, b'{"prompt": "hi", "system": "Be brief."}', tok, SETTINGS, 2048)
    raw = parse_request(2, b'{"prompt": "hi", "raw": true}', tok, SETTINGS, 2048)
    assert with_system.error is None and with_system.prompt_ids == encode_prompt(tok, "hi", system="Be brief.").ids
    assert raw.error is None and raw.prompt_ids == encode_prompt(tok, "hi", raw=True).ids


def test_an_over_long_line_is_an_error_without_being_read_whole():
    big = b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}\n{"prompt": "ok"}\n'
    lines = list(read_lines(io.BytesIO(big)))
    assert lines[0] == (1, None) and lines[1] == (2, b'{"prompt": "ok"}\n')


def test_a_file_from_a_windows_editor_reads_as_its_lines():
    """A byte-order mark before the first line made it the line's error ('Unexpected UTF-8 BOM')."""
    data = b'\xef\xbb\xbf{"id": "a", "prompt": "hi"}\r\n\r\n{"id": "b", "prompt": "yo"}\r\n'
    requests = [parse_request(n, raw, None, SETTINGS, 0) for n, raw in read_lines(io.BytesIO(data))]
    assert [(r.id, r.error) for r in requests] == [("a", None), ("b", None)]
    assert [n for n, _ in read_lines(io.BytesIO(b"\xef\xbb\xbf\n{}\n"))] == [2]  # a mark alone: a blank line


@pytest.mark.parametrize("bad_id", ["1.0", "true", "null", "[1]"])
def test_an_id_that_is_not_text_or_a_whole_number_says_so(bad_id):
    """`"id": 1.0` was refused as not 'a string or a number', though it is a number."""
    raw = b'{"id": ' + bad_id.encode() + b', "prompt": "hi"}'
    assert parse_request(1, raw, None, SETTINGS, 0).error == "`id` must be a string or a whole number"


@pytest.mark.parametrize(
    ("line", "key"),
    [
        (b'{"id": "a", "prompt": "x", "id": "b"}', "id"),
        (b'{"prompt": "x", "messages": [{"role": "user", "role": "x"}]}', "role"),
    ],
)
def test_a_key_given_twice_is_that_lines_error(line, key):
    """`{"id":"a","prompt":"x","id":"b"}` ran silently as id "b": json.loads keeps the last of a repeated key."""
    request = parse_request(1, line, None, SETTINGS, 0)
    assert (request.id, request.error) == ("1", f"the key '{key}' is given twice in one object")


def test_the_progress_total_counts_the_lines_that_run(tmp_path):
    """Blank lines counted: the bar ended at 2/4 for a file with two requests."""
    batch = tmp_path / "in.jsonl"
    batch.write_bytes(b'\xef\xbb\xbf\n{"prompt": "a"}\r\n \t\r\n\n{"prompt": "b"}')
    assert count_lines(batch) == len(list(read_lines(batch.open("rb")))) == 2


def test_the_progress_total_is_not_counted_through_binary_data(tmp_path):
    """`generate --batch disk.img` (20 GiB, sparse: NULs) read all 20 GiB for the bar's total, two minutes, before
    its first line's error ('line 1 holds a NUL byte'); the count stops at the first NUL (found by fuzz_cli.py)."""
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.write(b'{"prompt": "a"}\n')
        handle.truncate(64 << 20)  # 64 MiB of holes (NULs), as an image's
    assert count_lines(image) is None
    with pytest.raises(InputError, match="line 2 holds a NUL byte"):
        list(read_lines(image.open("rb")))


def test_a_utf16_batch_file_is_said_to_be_utf16_not_binary(tmp_path):
    """Notepad's "Unicode" JSONL was 'line 1 holds a NUL byte: this is binary data'."""
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"prompt": "a"}\n', encoding="utf-16")
    with pytest.raises(InputError, match=r"^line 1 is UTF-16 text: JSON Lines is UTF-8$") as caught:
        list(read_lines(batch.open("rb")))
    assert caught.value.hint == "convert it, e.g. iconv -f UTF-16 -t UTF-8"


class NeverEnds(ScriptedBackend):
    """Always the same non-EOS token: a sequence runs exactly max_tokens steps."""

    def forward(self, ids, cache):
        logits, cache = super().forward(ids, cache)
        logits[:] = 0.0
        logits[7] = 50.0
        return logits, cache


def test_a_result_behind_a_slower_line_waits_in_memory_until_an_interrupt_writes_it():
    """What the README promises: results are written in input order, so one that finished behind a slower earlier
    line is only in memory (kill -9 loses it; --resume runs it again) until Ctrl-C or SIGTERM writes it."""
    stream = io.StringIO()
    writer = ResultWriter(stream, sync=False)
    for index in (1, 2):
        writer.expect(index)
    writer.add(2, {"id": "fast", "text": "done"})
    assert stream.getvalue() == ""
    writer.flush_all(unfinished_ids={"slow"})
    assert [json.loads(line)["id"] for line in stream.getvalue().splitlines()] == ["fast"]


def _interrupt_engine_at_step(step: int, monkeypatch):
    """Ctrl-C in the engine's `step`-th step (as a signal would land); returns the real Engine.step."""
    original = Engine.step
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Engine, "step", interrupting)
    return original


def test_ctrl_c_keeps_what_finished_and_resume_completes_it(model, monkeypatch):
    _, tok = model
    backend = NeverEnds([], tok.vocab_size, context_length=128)
    original = _interrupt_engine_at_step(6, monkeypatch)
    lines = [json.dumps({"id": f"r{i}", "prompt": "hi", "max_tokens": 2 + 6 * i}) for i in range(3)]
    summary, first = _run((backend, tok), lines, parallel=3)
    assert summary.interrupted
    assert [r["id"] for r in first] == ["r0"]  # r0 took 2 steps; r1 and r2 needed 8 and 14
    monkeypatch.setattr(Engine, "step", original)
    _, rest = _run((backend, tok), lines, skip={"r0"})
    assert [r["id"] for r in rest] == ["r1", "r2"]
    assert [r["usage"]["completion_tokens"] for r in rest] == [8, 14]


def test_ctrl_c_before_a_line_finishes_never_lets_its_duplicates_error_mark_it_done(model, monkeypatch):
    """The error of a later line with the same id was written at Ctrl-C, past the gap: --resume then took the
    id as done and never ran the first line (its result lost, the run 'complete')."""
    _, tok = model
    backend = NeverEnds([], tok.vocab_size, context_length=128)
    original = _interrupt_engine_at_step(4, monkeypatch)
    lines = [
        json.dumps({"id": "x", "prompt": "hi", "max_tokens": 20}),
        json.dumps({"id": "x", "prompt": "again", "max_tokens": 1}),
        json.dumps({"id": "y", "prompt": "hi", "max_tokens": 1}),
    ]
    summary, first = _run((backend, tok), lines, parallel=3)
    assert summary.interrupted and [r["id"] for r in first] == ["y"]
    monkeypatch.setattr(Engine, "step", original)
    _, rest = _run((backend, tok), lines, skip={r["id"] for r in first})
    assert [(r["id"], "text" in r) for r in rest] == [("x", True), ("x", False)]
    assert rest[0]["usage"]["completion_tokens"] == 20


def test_results_held_for_input_order_behind_a_long_line_stay_bounded(model, monkeypatch):
    """A long first line and many short ones: every short result was held until the first was written (all
    100 here; all 9,999 of a 10,000-line file). Now no line starts while MAX_HELD_RESULTS are held."""
    from gptcli import batchfile

    _, tok = model
    backend = NeverEnds([], tok.vocab_size, context_length=128)
    monkeypatch.setattr(batchfile, "MAX_HELD_RESULTS", 5, raising=False)
    peak = 0

    class Watched(ResultWriter):
        def add(self, index, record):
            nonlocal peak
            super().add(index, record)
            peak = max(peak, len(self._waiting))

    lines = [json.dumps({"id": "long", "prompt": "hi", "max_tokens": 60})]
    lines += [json.dumps({"id": f"s{i}", "prompt": "hi", "max_tokens": 1}) for i in range(100)]
    data = io.BytesIO("".join(line + "\n" for line in lines).encode())
    requests = (parse_request(n, raw, tok, SETTINGS, 128) for n, raw in read_lines(data))
    stream = io.StringIO()
    summary = run_batch(LocalLines(Engine(backend, tok, EngineLimits(max_running=4))), requests, Watched(stream))
    results = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["id"] for r in results] == ["long"] + [f"s{i}" for i in range(100)] and summary.ok == 101
    assert peak <= 5 + 4  # the bound, plus what the lines already running finish in one step


def test_a_request_over_the_kv_budget_is_that_lines_error(model):
    backend, tok = model
    data = io.BytesIO(b'{"prompt": "hi", "max_tokens": 100}\n{"prompt": "hi", "max_tokens": 2}\n')
    requests = (parse_request(n, raw, tok, SETTINGS, backend.info.context_length) for n, raw in read_lines(data))
    engine = Engine(backend, tok, EngineLimits(max_running=2, kv_budget_tokens=20))
    stream = io.StringIO()
    summary = run_batch(LocalLines(engine), requests, ResultWriter(stream, sync=False))
    results = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "KV budget is 20" in results[0]["error"]["message"] and "text" in results[1]
    assert summary.ok == 1 and summary.failed == 1


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_messages_become_the_prompt_chat_builds_in_batch_files_and_the_server(tiny_models, family):
    """One prompt builder: a conversation is the chat template, or a plain transcript for a base model."""
    from gptcli.batch_requests import _encode_messages
    from gptcli.prompts import build_prompt, transcript
    from gptcli.server.prompt_ids import chat_request_prompt
    from gptcli.server.schemas import ChatMessage

    tok = Tokenizer(tiny_models[family])
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "ROMEO: But soft"},
        {"role": "assistant", "content": "what light"},
        {"role": "user", "content": "through yonder window"},
    ]
    expected = build_prompt(tok, turns, plain=transcript).ids
    assert _encode_messages(tok, turns).ids == expected
    assert chat_request_prompt(tok, [ChatMessage(**t) for t in turns]).ids == expected
    # OpenAI's `developer` message is the system message, to both
    newer = [{"role": "developer", "content": "Be brief."}, *turns[1:]]
    assert _encode_messages(tok, newer).ids == expected
    assert chat_request_prompt(tok, [ChatMessage(**t) for t in newer]).ids == expected


def test_openai_penalties_are_per_line_settings(model):
    lines = [
        json.dumps({"id": "p", "prompt": "Once upon a time", "presence_penalty": 2.0, "frequency_penalty": 1.5}),
        json.dumps({"id": "q", "prompt": "Once upon a time", "presence_penalty": 3}),
    ]
    summary, results = _run(model, lines)
    assert summary.ok == 1 and summary.failed == 1
    expected = _alone(model, "Once upon a time", presence_penalty=2.0, frequency_penalty=1.5)
    assert results[0]["text"] == expected.text != _alone(model, "Once upon a time").text
    assert "presence_penalty" in results[1]["error"]["message"]


def test_lines_that_share_a_start_read_it_once_and_answer_as_alone(model):
    shots = "Q: the capital of France? A: Paris. Q: the capital of Italy? A: Rome. Q: the capital of"
    questions = [" Spain? A:", " Peru? A:", " Japan? A:", " Chile? A:", " Kenya? A:"]
    lines = [json.dumps({"id": str(i), "prompt": shots + q, "raw": True}) for i, q in enumerate(questions)]
    summary, results = _run(model, lines, parallel=2, prefill_chunk=8, prefix_cache=2)
    assert summary.ok == 5
    for result, question in zip(results, questions, strict=True):
        assert result["text"] == _alone(model, shots + question, raw=True).text
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in results]
    assert cached[:2] == [0, 0] and all(c > 0 and c % 8 == 0 for c in cached[2:])  # after the first two finish


def test_live_token_count_equals_the_tokens_generated(model):
    """Text held back (a possible stop string) comes out once more at the end: it is not a new token."""
    _, tok = model
    script = [*tok.encode("Hello wor", add_special_tokens=False), min(tok.eos_ids)]
    backend = ScriptedBackend(script, tok.vocab_size, context_length=64)
    line = json.dumps({"prompt": "hi", "stop": ["Hello world"]}).encode()
    requests = [parse_request(1, line, tok, SETTINGS, 64)]
    counted: list[int] = []
    stream = io.StringIO()
    engine = Engine(backend, tok, EngineLimits(max_running=1))
    summary = run_batch(LocalLines(engine), requests, ResultWriter(stream, sync=False), on_token=counted.append)
    (result,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert result["text"] == "Hello wor"
    assert sum(counted) == summary.completion_tokens == len(script) - 1


def test_a_line_too_deep_or_too_big_for_the_parser_is_that_lines_error(model, tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "Once upon a time"}),
        "[" * 100_000 + "]" * 100_000,  # was: RecursionError, the run lost
        '{"id": ' + "1" * 5000 + ', "prompt": "x"}',  # was: int()'s digit limit
        json.dumps({"id": "b", "prompt": "hi"}),
    ]
    summary, results = _run(model, lines)
    assert [r["id"] for r in results] == ["a", "2", "3", "b"] and summary.ok == 2
    assert results[1]["error"]["message"] == "not valid JSON (nested too deeply)"
    # (int()'s own message named a Python call: "use sys.set_int_max_str_digits() to increase the limit")
    assert results[2]["error"]["message"] == "not valid JSON (a number of 5,000 digits, over 4,300)"
    from gptcli.jsonl import completed_ids

    done = tmp_path / "done.jsonl"
    done.write_text("[" * 100_000 + "\n" + '{"id": ' + "1" * 5000 + "}\n")
    assert completed_ids(done) == set()  # --resume reads such lines as not done, not as a crash


def test_finished_results_are_written_before_an_unexpected_failure_ends_the_run(model):
    backend, tok = model
    stream = io.StringIO()
    lines = [{"prompt": "a long one", "max_tokens": 40}, {"prompt": "a short one", "max_tokens": 1}]
    requests = [parse_request(n, json.dumps(line).encode(), tok, SETTINGS, 4096) for n, line in enumerate(lines, 1)]

    def broken(summary):
        raise RuntimeError("a progress display broke")

    engine = Engine(backend, tok, EngineLimits(max_running=2))
    with pytest.raises(RuntimeError):
        run_batch(LocalLines(engine), iter(requests), ResultWriter(stream, sync=False), on_result=broken)
    # line 2 finished first and waited for line 1 in the writer: it is on disk, not lost
    assert [json.loads(line)["id"] for line in stream.getvalue().splitlines()] == ["2"]


class _Written(io.StringIO):
    """The results stream: each result's id goes into `happened` as it is written."""

    def __init__(self, happened: list[str]) -> None:
        super().__init__()
        self.happened = happened

    def write(self, text: str) -> int:
        self.happened.append("wrote " + json.loads(text)["id"])
        return super().write(text)


def _producer(
    lines: list[bytes], happened: list[str], before_the_last: threading.Event
) -> tuple[io.BufferedReader, threading.Thread]:
    """A pipe and the slow producer writing into it: every line but the last at once, the last only after
    `before_the_last` is set (after 10 s at worst, so that a run that waits for it fails rather than hangs)."""
    read_fd, write_fd = os.pipe()

    def produce() -> None:
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(b"".join(lines[:-1]))
            pipe.flush()
            before_the_last.wait(timeout=10)
            happened.append("sent the last")
            pipe.write(lines[-1])

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    return os.fdopen(read_fd, "rb"), producer


def test_lines_run_and_are_written_while_a_pipe_is_quiet(model):
    """`--batch -` from a slow producer: the engine read the next line on its own thread, so every line running
    (and the writing of finished ones) waited for it. Now both lines finish and are written before the third
    is sent; then it runs, and the pipe's end ends the run."""
    _, tok = model
    backend = NeverEnds([], tok.vocab_size, context_length=128)
    happened: list[str] = []
    both_written = threading.Event()

    class Written(_Written):
        def write(self, text: str) -> int:
            written = super().write(text)
            if self.happened.count("wrote a") + self.happened.count("wrote b") == 2:
                both_written.set()
            return written

    lines = [
        json.dumps({"id": i, "prompt": "hi", "max_tokens": n}).encode() + b"\n"
        for i, n in [("a", 2), ("b", 20), ("c", 2)]
    ]
    pipe, producer = _producer(lines, happened, both_written)
    requests = (parse_request(n, raw, tok, SETTINGS, 128) for n, raw in read_lines(pipe))
    engine = Engine(backend, tok, EngineLimits(max_running=4))
    summary = run_batch(LocalLines(engine), requests, ResultWriter(Written(happened), sync=False), read_ahead=True)
    producer.join()
    assert happened == ["wrote a", "wrote b", "sent the last", "wrote c"] and summary.ok == 3


def test_client_mode_writes_results_and_starts_a_line_as_it_arrives(model):
    """Through --url the lines' requests run on threads, but the next line was read on the run's own: a
    finished result waited for it. Now it is written at once, and a line that arrives while a request runs
    silently starts at once (the wait for the server's next event wakes up for it)."""
    happened: list[str] = []
    first_written = threading.Event()
    last_started = threading.Event()

    class Written(_Written):
        def write(self, text: str) -> int:
            written = super().write(text)
            first_written.set()
            return written

    class Server:
        def chat(self, messages, params):
            name = messages[-1]["content"]
            if name == "last":
                last_started.set()
            elif name == "silent":  # says nothing until the last line's request has started
                name += " saw the last start" if last_started.wait(timeout=10) else " waited in vain"
            yield Token(name, None, 0.0)
            yield Finished("stop", NO_STATS, name, ())

    lines = [json.dumps({"prompt": p}).encode() + b"\n" for p in ("first", "silent", "last")]
    pipe, producer = _producer(lines, happened, first_written)
    requests = (parse_request(n, raw, None, SETTINGS, 0) for n, raw in read_lines(pipe))
    stream = Written(happened)
    summary = run_batch(RemoteLines(Server(), 4), requests, ResultWriter(stream, sync=False), read_ahead=True)
    producer.join()
    assert happened == ["wrote 1", "sent the last", "wrote 2", "wrote 3"] and summary.ok == 3
    texts = [json.loads(line)["text"] for line in stream.getvalue().splitlines()]
    assert texts == ["first", "silent saw the last start", "last"]


@pytest.mark.parametrize("read_ahead", [False, True])
def test_a_read_error_after_a_line_started_ends_the_run(model, read_ahead):
    """A NUL byte on line 2 (binary data) ends the run with its error, whether line 1 is still running when
    it is read (a file, read between steps) or the line is read ahead on a thread (a pipe)."""
    backend, tok = model
    data = io.BytesIO(b'{"id": "a", "prompt": "hi"}\n\0\n')
    requests = (parse_request(n, raw, tok, SETTINGS, backend.info.context_length) for n, raw in read_lines(data))
    lines = LocalLines(Engine(backend, tok, EngineLimits(max_running=2)))
    with pytest.raises(InputError, match=r"^line 2 holds a NUL byte"):
        run_batch(lines, requests, ResultWriter(io.StringIO(), sync=False), read_ahead=read_ahead)
