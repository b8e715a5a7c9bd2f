"""Client mode (`--url`): generate, chat and summarize against a real `gptcli serve` process.

One server (the tiny Llama on the torch backend, behind a key) serves the whole module. It names its
model by the model's folder, so the clients find the tokenizer here and count tokens exactly, as a
local run does: at temperature 0 the text must then be the text of the same command run locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import CHATML, REPO, CannedHandler, http_server, run_cli
from tests.test_server import free_port, scripted_env, serve_process

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

KEY = "sesame"
DOCUMENT = "\n\n".join(
    f"Chapter {i}. The river rose slowly through the night and the town watched it climb. "
    "By morning the bridge was closed and the market moved to the hill."
    for i in range(6)
)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory) -> Iterator[dict[str, str]]:
    """`gptcli serve` of the tiny Llama; yields the model's folder and the client flags that reach it."""
    # A context of 1024 (rotary positions: the weights do not change), so that summarize's instructions fit.
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-1k"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    model = str(folder)
    home = tmp_path_factory.mktemp("server-home")
    env = {"GPTCLI_HOME": str(home), "XDG_CONFIG_HOME": str(home / "xdg"), "HF_HUB_OFFLINE": "1"}
    env = {**env, "GPTCLI_BACKEND_PATHS": ""}
    # serve_process asks for the scripted backend; the later --backend wins (click keeps the last value).
    flags = ("--backend", "torch", "--api-key", KEY, "--served-model-name", model, "--log-level", "warning")
    with serve_process(folder, *flags, env=env) as (_, url):
        yield {"model": model, "url": url + "/v1"}


def remote(server: dict[str, str], *args: str) -> tuple[str, ...]:
    return (*args, "--url", server["url"], "--api-key", KEY)


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return result.stdout.decode()


@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
def test_generate_gives_the_local_text(server, raw):
    args = ("generate", "Once upon a time", "-t", "0", "-n", "12", *(["--raw"] if raw else []))
    here = ok(run_cli(*args, "-m", server["model"]))
    there = ok(run_cli(*remote(server, *args)))
    assert there == here and there.strip()


def test_generate_json_and_stats(server):
    result = run_cli(*remote(server, "generate", "The capital of France is", "-t", "0", "-n", "6", "--json", "--stats"))
    data = json.loads(ok(result))
    assert data["model"] == server["model"] and data["url"] == server["url"] and data["templated"] is True
    assert data["finish_reason"] in {"stop", "length"} and isinstance(data["text"], str)
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(data["timings"]) == {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "total_s"}
    assert f"finish {data['finish_reason']} · {server['model']} at {server['url']}" in result.stderr.decode()
    # A drawn seed is reported (it was null), and repeats the sampled reply as a local run's does.
    sampled = ("generate", "Once upon a time", "-t", "1.0", "-n", "8", "--json")
    first = json.loads(ok(run_cli(*remote(server, *sampled))))
    assert isinstance(first["seed"], int)
    again = json.loads(ok(run_cli(*remote(server, *sampled, "--seed", str(first["seed"])))))
    assert again["text"] == first["text"]


def test_generate_templates_render_here(server):
    args = ("generate", "Bonjour", "--to", "English", "-t", "0", "-n", "8")
    assert ok(run_cli(*remote(server, *args))) == ok(run_cli(*args, "-m", server["model"]))


def test_chat_pipe_two_turns_are_saved(server, isolated_home):
    from gptcli.chat import ConversationStore

    turns = "Hello there\n/show\nWhat did I just say?\n/stats\n"
    here = ok(run_cli("chat", "-m", server["model"], "-t", "0", "-n", "8", input=turns))
    # The key from the environment this time.
    result = run_cli("chat", "--url", server["url"], "-t", "0", "-n", "8", input=turns, env={"OPENAI_API_KEY": KEY})
    there = ok(result)
    assert there == here
    err = result.stderr.decode()
    assert f"at {server['url']}" in err and "about " in err and "tok/s" in err  # /show, then /stats
    # The server decodes: gptcli's repetition stop cannot apply, and its cache is the server's, not the last turn's.
    assert "repetition_stop    True (not applied: the server decodes the reply)" in err
    assert "cached by the server)" in err and "reused from the last turn" not in err
    conversations = ConversationStore().list()
    assert len(conversations) == 2
    saved = ConversationStore().latest()
    assert saved.model == server["model"]
    assert [m["role"] for m in saved.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in saved.messages[::2]] == ["Hello there", "What did I just say?"]
    replies = [m["content"] for m in saved.messages[1::2]]
    assert there == "".join(r if r.endswith("\n") else r + "\n" for r in replies)
    assert all("stats" in m for m in saved.messages[1::2])


def test_a_chat_over_url_records_no_chat_template_it_did_not_use(server, isolated_home, tmp_path):
    """The server renders the chat: a template from the environment or a config file was not used, but was saved
    with the conversation, so resuming it here rendered it with a template it never had. A resumed chat's own stays."""
    from gptcli.chat import ConversationStore

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(f"chat_template: {template}\n", encoding="utf-8")
    for args, env in (([], {"GPTCLI_CHAT_TEMPLATE": str(template)}), (["--config", str(config)], None)):
        ok(run_cli("chat", *remote(server, "-t", "0", "-n", "2", *args), input="Hi\n", env=env))
        latest = ConversationStore().latest()
        assert latest.chat_template is None and len(latest.messages) == 2, args or env
    ok(run_cli("chat", "-m", server["model"], "-n", "2", "--chat-template", str(template), input="Hi\n"))
    ok(run_cli("chat", *remote(server, "--continue", "-n", "2"), input="More\n"))
    assert ConversationStore().latest().chat_template == str(template)  # the chat's own: its first turn used it


def test_summarize_gives_the_local_summary(server):
    args = ("summarize", "-t", "0", "-n", "8", "--parallel", "4", "--chunk-tokens", "120", "--overlap", "0", "--json")
    args += ("--strategy", "map-reduce")
    here = json.loads(ok(run_cli(*args, "-m", server["model"], input=DOCUMENT)))
    there = json.loads(ok(run_cli(*remote(server, *args), input=DOCUMENT)))
    assert there["strategy"] == "map-reduce" and len(there["chunk_tokens"]) >= 2  # several calls, on threads
    assert there["chunk_tokens"] == here["chunk_tokens"] and there["combine_levels"] == here["combine_levels"]
    assert there["summary"] == here["summary"] and there["summary"]
    assert there["url"] == server["url"] and len(there["calls"]) == len(here["calls"])


def test_summarize_counts_with_the_servers_tokenizer_when_it_is_not_here(server):
    # "default" is an alias the server answers to, and no model here: the server's /tokenize counts.
    args = ("summarize", "-t", "0", "-n", "8", "--parallel", "4", "--chunk-tokens", "120", "--overlap", "0", "--json")
    args += ("--strategy", "map-reduce")
    here = json.loads(ok(run_cli(*args, "-m", server["model"], input=DOCUMENT)))
    result = run_cli(*remote(server, *args, "-m", "default"), input=DOCUMENT)
    there = json.loads(ok(result))
    assert there["chunk_tokens"] == here["chunk_tokens"] and len(there["chunk_tokens"]) >= 2
    assert "estimated" not in result.stderr.decode()


def test_a_server_without_tokenize_leaves_the_estimate(capsys):
    from gptcli.cli.remote_run import served_tokenizer
    from gptcli.errors import RemoteError
    from gptcli.remote_tokens import EstimatedTokenizer

    class NoTokenize:
        model, root_url = "gpt-4o-mini", "http://127.0.0.1:9"

        def post_json(self, path: str, payload: Any, *, at_root: bool = False) -> Any:
            raise RemoteError(f"{self.root_url}{path} answered 404: not found")

    assert isinstance(served_tokenizer(NoTokenize()), EstimatedTokenizer)
    assert "http://127.0.0.1:9 has no /tokenize: token counts are estimated" in capsys.readouterr().err


def test_a_batch_file_on_the_server_gives_the_local_results(server, tmp_path):
    lines = [
        {"id": "p", "prompt": "Once upon a time"},
        {"id": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"id": "r", "prompt": "The river rose", "raw": True, "max_tokens": 5},
        {"id": "s", "prompt": "Once upon a time", "temperature": 0.9, "seed": 7},
        {"id": "bad", "prompt": "hi", "temprature": 1},
        {"id": "long", "prompt": "word " * 1200},  # over the 1024-token context: the server refuses it
        {"id": "p", "prompt": "a duplicate id"},
    ]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("generate", "--batch", str(batch), "-t", "0", "-n", "8", "--parallel", "3")
    here = [json.loads(line) for line in ok(run_cli(*args, "-m", server["model"])).splitlines()]
    out = tmp_path / "results.jsonl"
    result = run_cli(*remote(server, *args, "-o", str(out)))
    ok(result)
    there = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in there] == ["p", "m", "r", "s", "bad", "long", "p"]
    for mine, theirs in zip(here[:4], there[:4], strict=True):
        assert theirs["text"] == mine["text"] and theirs["usage"] == mine["usage"], theirs["id"]
    assert "temprature" in there[4]["error"]["message"] and "duplicate id" in there[6]["error"]["message"]
    assert "answered 400" in there[5]["error"]["message"] and "1024" in there[5]["error"]["message"]
    assert "4 done, 3 failed, 0 skipped" in result.stderr.decode()
    # --resume sends only what the file lacks; a wrong key ends the run with one clear error (exit 1).
    out.write_text("".join(json.dumps(r) + "\n" for r in there[:2]))
    result = run_cli(*remote(server, *args, "-o", str(out), "--resume"))
    assert ok(result) == "" and "resuming: 2 results" in result.stderr.decode()
    assert "2 done, 2 failed, 3 skipped" in result.stderr.decode()  # the duplicate "p" is skipped with the first
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["p", "m", "r", "s", "bad", "long"]
    wrong = run_cli(*args, "--url", server["url"], "--api-key", "wrong")
    assert wrong.returncode == 1 and wrong.stderr.decode().count("error: ") == 1 and "401" in wrong.stderr.decode()


def test_structured_output_goes_to_the_server_as_response_format(server, tmp_path):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}))
    args = ("generate", "Who are you?", "-t", "0", "-n", "24", "--json-schema", str(schema))
    here = ok(run_cli(*args, "-m", server["model"]))
    assert ok(run_cli(*remote(server, *args))) == here
    loose = ok(run_cli(*remote(server, "generate", "Hi", "-t", "0", "-n", "24", "--format", "json")))
    assert loose.startswith("{")  # a JSON object (OpenAI's json_object), whole when it ends before -n
    refused = run_cli(*remote(server, "generate", "Hi", "--regex", "[0-9]+"))
    assert refused.returncode == 2 and "OpenAI's API has no regex format" in refused.stderr.decode()


def test_a_wrong_key_is_one_clear_error(server):
    result = run_cli("generate", "hi", "--url", server["url"], "--api-key", "wrong")
    err = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert err.startswith("error: ") and "401" in err.splitlines()[0] and "Traceback" not in err
    assert "hint: pass --api-key KEY or set OPENAI_API_KEY" in err


def test_a_piped_chat_ends_at_an_error_that_is_not_the_messages_own(server, isolated_home):
    """An unknown model (404): each line failed alike and the chat still exited 0. It now ends before the first
    line, as a local chat whose model cannot load does: the server's tokenizer is asked for first, and its 404
    says the model is not served (it was taken for a server without /tokenize, and noted so)."""
    result = run_cli(*remote(server, "chat", "-m", "nosuch", "--jsonl"), input="hi\nhello\n")
    err = result.stderr.decode()
    assert result.returncode == 5 and result.stdout == b"", err
    assert err.count("error: ") == 1 and "the model 'nosuch' does not exist" in err and "/tokenize" not in err


def test_a_refused_connection_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    for args in (("generate", "hi"), ("summarize",), ("chat",)):
        result = run_cli(*args, "--url", url, input="some text")
        err = result.stderr.decode()
        assert result.returncode == 1 and result.stdout == b"", err
        assert err.startswith(f"error: cannot connect to {url}") and "hint: is the server running?" in err


@pytest.mark.parametrize(
    "args",
    [
        ("generate", "hi", "--backend", "torch"),
        ("generate", "hi", "--device", "cpu", "--dtype", "float32"),
        ("generate", "--batch", "requests.jsonl", "--kv-budget", "4096"),
        ("chat", "--precision", "int4"),
        ("summarize", "--threads", "2"),
    ],
)
def test_flags_for_a_local_model_are_usage_errors(args):
    result = run_cli(*args, "--url", "http://127.0.0.1:9/v1", input="text")
    assert result.returncode == 2, result.stderr.decode()
    assert "--url" in result.stderr.decode() and "Traceback" not in result.stderr.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "hi", "--timeout", "5"), "--timeout: only used with --url"),
        (("chat", "--timeout", "0", "--url", "http://127.0.0.1:9/v1"), "--timeout 0: not a number of seconds"),
        (("summarize", "--timeout", "nan", "--url", "http://127.0.0.1:9/v1"), "--timeout nan: not a number"),
        (("generate", "hi", "--timeout", "inf", "--url", "http://127.0.0.1:9/v1"), "--timeout inf: not a number"),
    ],
)
def test_a_timeout_without_a_server_or_of_no_seconds_is_a_usage_error(args, message):
    result = run_cli(*args, input="text")
    err = result.stderr.decode()
    assert result.returncode == 2 and message in err and "Traceback" not in err


class Slow(CannedHandler):
    """A server that lists its model at once and answers a completion after 4 s."""

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "slow"}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("tokenize"):
            self.answer(200, json.dumps({"tokens": [1, 2]}).encode())
            return
        time.sleep(4)
        chunk = {"choices": [{"index": 0, "delta": {"content": "late"}, "finish_reason": "stop"}]}
        with contextlib.suppress(OSError):  # the client that gave up has gone
            self.answer(200, f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")


@pytest.fixture(scope="module")
def slow() -> Iterator[str]:
    with http_server(Slow) as url:
        yield f"{url}/v1"


def test_timeout_sets_how_long_a_slow_server_is_waited_for(slow, isolated_home):
    # The 600 s wait had no setting: a user could neither give up sooner nor wait longer for a loaded server.
    result = run_cli("generate", "hi", "--url", slow, "--timeout", "1")  # the answer comes after 4 s
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert f"error: {slow} did not answer in 1 s" in err and "hint: is the server overloaded? (--timeout" in err
    result = run_cli("generate", "hi", "--url", slow, "--timeout", "30")
    assert (result.returncode, result.stdout.decode().strip()) == (0, "late"), result.stderr.decode()


# ------------------------------------------------------------------ the chat session, without a server


class Refusing:
    """A server whose context holds `limit` messages: more are refused as OpenAI refuses them."""

    base_url = "http://server/v1"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent: list[int] = []

    def chat(self, messages, params) -> Iterator[Any]:
        from gptcli.decoding import Finished, Stats, Token
        from gptcli.errors import ContextLengthError

        self.sent.append(len(messages))
        if len(messages) > self.limit:
            raise ContextLengthError("answered 400: maximum context length exceeded")
        yield Token("ok", None, 0.0)
        yield Finished("stop", Stats(len(messages), 0, 1, 0, 0.1, 0.1, 0.0, 0.1), "ok", ())


def test_a_refused_window_drops_the_oldest_exchange_and_sends_again():
    from gptcli.chat import Conversation
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.config import Settings
    from gptcli.errors import ContextLengthError
    from gptcli.remote_tokens import EstimatedTokenizer

    warnings: list[str] = []
    server = Refusing(limit=4)
    chat = RemoteChatSession(server, EstimatedTokenizer(), Settings(), Conversation(), warn=warnings.append)
    for text in ("one", "two", "three"):
        assert "".join(e.text for e in chat.say(text) if hasattr(e, "id")) == "ok"
    assert server.sent == [1, 3, 5, 3]  # the third window was refused, then sent without the first exchange
    assert chat.conversation.window_start == 2 and len(chat.conversation.messages) == 6  # all saved
    assert len(warnings) == 1 and "outgrew the context" in warnings[0]
    server.limit = 0  # nothing fits: the message is not kept
    with pytest.raises(ContextLengthError):
        chat.say("four")
    assert len(chat.conversation.messages) == 6 and chat.conversation.window_start == 2


class Breaking:
    """A server whose stream breaks after its first text."""

    base_url = "http://server/v1"

    def chat(self, messages, params) -> Iterator[Any]:
        from gptcli.decoding import Token
        from gptcli.errors import RemoteError

        yield Token("Partial", None, 0.0)
        raise RemoteError("http://server/v1 closed the stream before the answer finished")


def test_a_reply_whose_stream_breaks_is_kept_as_far_as_it_came(tmp_path):
    # The error went up and the reply was never recorded: the chat file ended at the user's message, the text
    # already shown was lost, and the next message made two user messages in a row.
    from gptcli.chat import Conversation, ConversationStore
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.config import Settings
    from gptcli.errors import RemoteError
    from gptcli.remote_tokens import EstimatedTokenizer

    store = ConversationStore(tmp_path)
    chat = RemoteChatSession(Breaking(), EstimatedTokenizer(), Settings(), Conversation(), store)
    with pytest.raises(RemoteError, match="closed the stream"):
        list(chat.say("hello"))
    saved = store.load(chat.conversation.id).messages
    assert [(m["role"], m["content"], m.get("interrupted")) for m in saved] == [
        ("user", "hello", None),
        ("assistant", "Partial", True),
    ]


def test_the_repl_goes_on_after_a_reply_the_server_broke_off(tmp_path, monkeypatch, capsys):
    # The error ended the session (exit 1, no 'saved as'), where a message the server refuses is reported and
    # the prompt comes back; the reply is kept as far as it came.
    from gptcli.chat import Conversation, ConversationStore
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.cli.chat_repl import Repl
    from gptcli.config import Settings
    from gptcli.remote_tokens import EstimatedTokenizer

    monkeypatch.setattr(Repl, "_make_prompt", lambda self: None)
    lines = ["hello", "again"]

    def read(self: Any, continuation: bool = False) -> str:
        if not lines:
            raise EOFError  # Ctrl-D
        return lines.pop(0)

    monkeypatch.setattr(Repl, "read", read)
    store = ConversationStore(tmp_path)
    session = RemoteChatSession(Breaking(), EstimatedTokenizer(), Settings(), Conversation(), store)
    Repl(session, "server", markdown=False).run()
    err = capsys.readouterr().err
    assert f"saved as {session.conversation.id}" in err
    assert err.count("error: http://server/v1 closed the stream before the answer finished") == 2
    replies = [m["content"] for m in store.load(session.conversation.id).messages if m["role"] == "assistant"]
    assert replies == ["Partial", "Partial"]


class CutShort(CannedHandler):
    """A server whose chat stream breaks off after "Partial" (no finish reason, no [DONE]); no /tokenize."""

    protocol_version = "HTTP/1.0"  # the stream ends where the connection closes

    model = "cut"

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": [{"id": self.model}]}).encode(), length=False)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.endswith("tokenize"):
            self.answer(404, b"Not Found", "text/plain", length=False)
            return
        self.answer(200, self.stream().encode(), "text/event-stream", length=False)

    def stream(self) -> str:
        chunk = {"choices": [{"index": 0, "delta": {"content": "Partial"}, "finish_reason": None}]}
        return f"data: {json.dumps(chunk)}\n\n"


@pytest.fixture(scope="module")
def cut_short() -> Iterator[str]:
    with http_server(CutShort) as url:
        yield f"{url}/v1"


def test_a_stream_broken_off_still_gives_generate_json_its_object(cut_short, isolated_home):
    # generate --json printed nothing of the text that came (a plain generate had streamed it).
    result = run_cli("generate", "hi", "--json", "--url", cut_short)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("error:") == 1 and "Traceback" not in err
    data = json.loads(result.stdout)
    assert (data["text"], data["finish_reason"], data["usage"]["completion_tokens"]) == ("Partial", "error", 1)
    # The prompt's tokens are not known (a server says them at the end): null, where it said 0
    assert data["usage"]["prompt_tokens"] is None and data["usage"]["total_tokens"] is None
    # Its times are the client's own (they were all 0.0, and ttft_s 0.0 for a token that came).
    assert data["timings"]["ttft_s"] > 0 and data["timings"]["total_s"] >= data["timings"]["ttft_s"]
    assert data["error"] == f"{cut_short} closed the stream before the answer finished"


class FailsFirst(CutShort):
    """A server whose chat stream begins (a 200, the role) and then fails before any text: an error event, as
    gptcli serve's shutdown sends one for a request still queued when --grace runs out; or nothing more."""

    model = "fails"

    def stream(self) -> str:
        role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        body = f"data: {json.dumps(role)}\n\n"
        if "/error/" in self.path:
            error = {"error": {"message": "the server is shutting down", "type": "server_overloaded", "code": None}}
            body += f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
        return body


@pytest.mark.parametrize("how", ["error", "cut"])
def test_a_stream_that_fails_before_its_first_token_still_gives_generate_json_its_object(how, isolated_home):
    # generate --json printed no object when the answer broke off before any text (its first event was the
    # error), though it began as a 200: a script reading stdout got nothing to parse (QA)
    with http_server(FailsFirst) as url:
        result = run_cli("generate", "hi", "--json", "--url", f"{url}/{how}/v1")
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("error:") == 1 and "Traceback" not in err
    data = json.loads(result.stdout)
    assert (data["text"], data["finish_reason"], data["usage"]["completion_tokens"]) == ("", "error", 0)
    assert data["error"] in err and data["timings"]["ttft_s"] is None
    # no answer at all (the server gone: a refused connection) is still an error before anything is printed
    refused = run_cli("generate", "hi", "--json", "--url", f"{url}/v1")
    assert refused.returncode == 1 and refused.stdout == b""


def test_a_stream_broken_off_still_gives_chat_jsonl_its_record(cut_short, isolated_home):
    # chat --jsonl wrote no record for the message, where each message gets exactly one.
    result = run_cli("chat", "--jsonl", "--url", cut_short, input="hello\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr.decode()
    [record] = [json.loads(line) for line in result.stdout.decode().splitlines()]
    # ... and that record had no text nor conversation id, where the chat file kept what came (QA)
    conversation = record.pop("conversation")
    assert record == {
        "role": "assistant",
        "content": "Partial",
        "finish_reason": "error",
        "error": f"{cut_short} closed the stream before the answer finished",
        "hint": None,
    }
    saved = json.loads(next((isolated_home / "data" / "chats").glob("*.json")).read_text())
    assert saved["id"] == conversation and saved["messages"][-1]["content"] == "Partial"


def test_the_estimate_trims_before_sending_when_the_server_says_its_context():
    from gptcli.chat import Conversation, show_text
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.config import SamplingConfig, Settings
    from gptcli.remote_tokens import EstimatedTokenizer

    server = Refusing(limit=100)
    settings = Settings(sampling=SamplingConfig(max_tokens=10))
    chat = RemoteChatSession(server, EstimatedTokenizer(), settings, Conversation(), context_length=50)
    for text in ("x" * 40, "y" * 40, "z" * 40):  # 10 estimated tokens + 4 per message
        list(chat.say(text))
    # 50 - 10 kept for the reply = 40: each window sent held the last exchange and the new message (33).
    assert server.sent == [1, 3, 3] and chat.conversation.window_start == 2
    # The window is 38 now, but the next message's 4 make 42: that turn drops the exchange before (was '38 used').
    assert chat.budget_line() == "about 23 used / 27 left of 50 (up to 10 per reply)"
    assert "trimmed            2 oldest messages no longer sent to the model; the next drops 2 more" in show_text(chat)


def test_ctrl_c_keeps_what_was_printed_and_exits_130(tiny_models):
    from gptcli.tokenizer import Tokenizer

    text = "Once upon a time there was a tiny model that wanted to write poems about autumn leaves. " * 3
    env = scripted_env(Tokenizer(tiny_models["llama"]), text, delay=0.05)  # a slow server: 20 tokens a second
    with serve_process(tiny_models["llama"], "--log-level", "warning", env=env) as (_, url):
        client = subprocess.Popen(
            [sys.executable, "-m", "gptcli", "generate", "x", "--url", url + "/v1", "-n", "100", "--raw"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        first = os.read(client.stdout.fileno(), 100)  # the reply has begun
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
    printed = (first + out).decode()
    assert client.returncode == 130, err.decode()
    assert printed.strip() and text.startswith(printed.rstrip("\n")) and len(printed) < len(text)
    assert err.decode().rstrip().endswith("interrupted") and b"Traceback" not in err


def running(url: str) -> float:
    """The server's running sequences, from its /metrics."""
    import re

    import httpx

    return float(re.search(r"^gptcli_running_sequences (\S+)$", httpx.get(url + "/metrics").text, re.M).group(1))


def test_ctrl_c_during_summarize_prints_the_partial_result_and_exits_130(tiny_models, tmp_path):
    from gptcli.tokenizer import Tokenizer

    env = scripted_env(Tokenizer(tiny_models["llama"]), "x", delay=0.05)
    env = {**env, "GPTCLI_TEST_CONTEXT": "600", "GPTCLI_TEST_SCRIPT": json.dumps([7] * 5000)}  # no end of sequence
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT * 3)
    with serve_process(tiny_models["llama"], "--log-level", "warning", env=env) as (_, url):
        args = ["summarize", str(doc), "--url", url + "/v1", "--strategy", "map-reduce", "--chunk-tokens", "60"]
        client = subprocess.Popen(
            [sys.executable, "-m", "gptcli", *args, "-n", "400", "--parallel", "3", "--overlap", "0", "--json"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(300):  # until the server decodes the three calls the client sent together
            if running(url) == 3 or client.poll() is not None:
                break
            time.sleep(0.1)
        assert running(url) == 3
        client.send_signal(signal.SIGINT)
        out, err = client.communicate(timeout=30)
        assert client.returncode == 130, err.decode()
        data = json.loads(out)
        assert data["partial"] is True and data["partials"] == [] and data["parallel"] == 3
        assert "0 of " in err.decode() and "chunk summaries were finished" in err.decode()
        assert b"Traceback" not in err
        # The threads closed their connections: the server stops decoding for them.
        for _ in range(100):
            if running(url) == 0:
                break
            time.sleep(0.1)
        assert running(url) == 0


class Hostile(CannedHandler):
    """A server whose model id and error message hold what a terminal acts on: OSC (retitle), CSI (clear the
    screen, colour) and a right-to-left override."""

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "m\x1b]0;pwned\x07\x1b[2J"}]}).encode())

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        error = {"message": "bad \x1b[31mred\x1b[0m \u202etxet", "type": "invalid_request_error"}
        self.answer(400, json.dumps({"error": error}).encode())


def test_what_a_server_says_reaches_the_terminal_as_text_not_as_control_sequences(isolated_home):
    # The model id in "using …" and the error message went to stderr raw: a server could retitle, clear or
    # recolour the user's terminal, or reorder the error line.
    with http_server(Hostile) as root:
        result = run_cli("generate", "hi", "--url", f"{root}/v1")
    err = result.stderr.decode()
    assert result.returncode == 6 and err.count("error:") == 1
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    assert "using m\\x1b]0;pwned\\x07\\x1b[2J at" in err
    assert "bad \\x1b[31mred\\x1b[0m \\u202etxet" in err


@pytest.fixture(scope="module")
def plain_server(tiny_models, tmp_path_factory) -> Iterator[dict[str, str]]:
    """`gptcli serve` of the tiny Llama without its chat template (a base model, a `gptcli train` run)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-plain"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    home = tmp_path_factory.mktemp("plain-home")
    env = {"GPTCLI_HOME": str(home), "XDG_CONFIG_HOME": str(home / "xdg"), "HF_HUB_OFFLINE": "1"}
    flags = ("--backend", "torch", "--api-key", KEY, "--served-model-name", str(folder), "--log-level", "warning")
    with serve_process(folder, *flags, env={**env, "GPTCLI_BACKEND_PATHS": ""}) as (_, url):
        yield {"model": str(folder), "url": url + "/v1"}


def test_a_served_model_without_a_chat_template_completes_prompts_as_a_local_run_does(plain_server, tmp_path):
    """Here such a model completes the prompt's text; --url sent it as a chat message, which the server framed
    as a "User: ... Assistant:" transcript: another prompt, another answer (generate, batch lines, summarize)."""
    server = plain_server
    args = ("generate", "Once upon a time", "-t", "0", "-n", "12", "--json", "--system", "Be brief.")
    local = run_cli(*args, "-m", server["model"])
    served = run_cli(*remote(server, *args))
    here, there = json.loads(ok(local)), json.loads(ok(served))
    assert (there["text"], there["usage"], there["templated"]) == (here["text"], here["usage"], False)
    for result in (local, served):
        assert "this model has no chat template: --system is ignored" in result.stderr.decode()
    lines = [{"id": "a", "prompt": "Once upon a time"}, {"id": "b", "prompt": "The river rose", "max_tokens": 5}]
    batch = tmp_path / "requests.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch_args = ("generate", "--batch", str(batch), "-t", "0", "-n", "8")
    mine = [json.loads(line) for line in ok(run_cli(*batch_args, "-m", server["model"])).splitlines()]
    theirs = [json.loads(line) for line in ok(run_cli(*remote(server, *batch_args))).splitlines()]
    assert [(r["text"], r["usage"]) for r in theirs] == [(r["text"], r["usage"]) for r in mine]
    summary = ("summarize", "-t", "0", "-n", "8", "--chunk-tokens", "120", "--overlap", "0", "--json")
    summary += ("--strategy", "map-reduce")
    here = json.loads(ok(run_cli(*summary, "-m", server["model"], input=DOCUMENT)))
    there = json.loads(ok(run_cli(*remote(server, *summary), input=DOCUMENT)))
    assert there["summary"] == here["summary"] and there["calls"] and len(there["calls"]) == len(here["calls"])
    assert [c["prompt_tokens"] for c in there["calls"]] == [c["prompt_tokens"] for c in here["calls"]]
