"""`gptcli chat` on a pipe: --jsonl records, and a chat whose store cannot be written."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli
from tests.test_chat import say, scripted_env
from tests.test_hardening import _without_file_permission_bypass


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def test_jsonl_gives_one_object_per_reply_even_a_multi_line_one(tiny_models, tok, isolated_home):
    env = scripted_env(say(tok, "One.\nTwo.") + say(tok, "Three."))
    lines = 'Hi\n/show\n"""\nsecond\nmessage\n"""\n'
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--jsonl", input=lines, env=env)
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 2  # /show's output went to stderr
    assert [r["content"] for r in records] == ["One.\nTwo.", "Three."]
    assert {r["role"] for r in records} == {"assistant"}
    assert {r["finish_reason"] for r in records} == {"stop"}
    saved = list((isolated_home / "data" / "chats").glob("*.json"))
    assert [r["conversation"] for r in records] == [saved[0].stem] * 2
    first, second = (r["usage"] for r in records)
    assert first["completion_tokens"] == len(say(tok, "One.\nTwo.")) - 1  # the end token is not counted
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the second turn sees the history
    messages = json.loads(saved[0].read_text())["messages"]
    assert [m["content"] for m in messages] == ["Hi", "One.\nTwo.", "second\nmessage", "Three."]


def test_verbose_chat_gives_each_reply_s_timings(tiny_models, tok):
    env = scripted_env(say(tok, "One.") + say(tok, "Two."))
    result = run_cli("-v", "chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="a\nb\n", env=env)
    assert result.returncode == 0 and result.stdout.decode() == "One.\nTwo.\n"
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("loaded tiny-llama ") and len(lines) == 3
    assert all(line.startswith("prompt ") and " reused" in line for line in lines[1:]), lines


def test_jsonl_answers_a_refused_message_with_an_error_record(tiny_models, tok):
    env = scripted_env(say(tok, "Fine."), GPTCLI_TEST_CONTEXT="48")
    too_long = "word " * 200
    result = run_cli(
        "chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--jsonl", "-n", "4",
        input=f"/bogus\n{too_long}\nHi\n", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 2  # nothing for the bad slash command, an error for the refused message
    assert records[0]["error"].startswith("the message needs ")
    assert records[1]["role"] == "assistant"
    assert "error: unknown command /bogus" in result.stderr.decode()


def test_a_read_only_store_warns_once_keeps_answering_and_fails_at_the_end(tiny_models, tok, isolated_home):
    data = isolated_home / "data"
    data.mkdir(parents=True)
    data.chmod(0o500)
    try:
        env = scripted_env(say(tok, "First.") + say(tok, "Second."))
        command = [*_without_file_permission_bypass(), sys.executable, "-m", "gptcli"]
        command += ["chat", "-m", str(tiny_models["llama"]), "-b", "scripted"]
        result = subprocess.run(
            command, input=b"a\nb\n", capture_output=True, cwd=REPO, env={**os.environ, **env}, timeout=120
        )
    finally:
        data.chmod(0o700)
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert result.stdout.decode() == "First.\nSecond.\n"  # the conversation went on
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: cannot write {data}/chats: Permission denied: the chat goes on unsaved "
        "(/save FILE.json keeps a copy elsewhere)"
    ]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: cannot write {data}/chats: Permission denied"]
    assert result.returncode == 1


def test_a_piped_line_over_the_limit_is_answered_with_its_error_and_the_chat_goes_on(tiny_models, tok):
    env = scripted_env(say(tok, "Fine."))
    lines = b"x" * (3 * 1024 * 1024) + b"\n\xff-not-utf8\nHi\n"
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--jsonl", "-n", "4",
                     input=lines, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()  # was: exit 6 at the long line, "Hi" never answered
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert "over the 1 MiB limit for one chat message" in records[0]["error"]
    assert "not valid UTF-8" in records[1]["error"]
    assert records[2]["content"] == "Fine."


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_reply_stdout_cannot_take_is_kept_in_the_chat_file(tiny_models, tok, isolated_home):
    """`printf 'Hi\\n' | gptcli chat > /dev/full` (or `| head -c 1`) saved the user's message and lost the reply:
    the chat file now keeps what was generated, marked interrupted, as Ctrl-C does."""
    env = {**os.environ, **scripted_env(say(tok, "One. Two. Three."))}
    command = [sys.executable, "-m", "gptcli", "chat", "-m", str(tiny_models["llama"]), "-b", "scripted"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(command, input=b"Hi\n", stdout=full, stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert result.returncode == 1
    assert (
        result.stderr.decode().splitlines()[-1] == "error: cannot write to stdout (/dev/full): No space left on device"
    )
    [saved] = (isolated_home / "data" / "chats").glob("*.json")
    user, reply = json.loads(saved.read_text())["messages"]
    assert (user["content"], reply["role"], reply["interrupted"]) == ("Hi", "assistant", True)
    assert reply["content"] and "One. Two. Three.".startswith(reply["content"])


def test_an_over_long_line_from_a_pipe_gets_its_error_before_the_line_ends(tiny_models, isolated_home):
    """QA: a piped chat line over 1 MiB got its error record only when its newline came; one that never ends (`tr
    '\\0' a </dev/zero | gptcli chat --jsonl`) got none at all, as `generate --batch -` did before."""
    import select

    args = ["chat", "-m", str(tiny_models["llama"]), "--jsonl", "-n", "1"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen([sys.executable, "-m", "gptcli", *args], cwd=REPO, **pipes)  # type: ignore[call-overload]
    try:
        proc.stdin.write(b"a" * (2 * 1024 * 1024))  # over the 1 MiB a message, and no newline
        proc.stdin.flush()
        readable, _, _ = select.select([proc.stdout], [], [], 60)
        first = json.loads(proc.stdout.readline()) if readable else {}
        assert first.get("error") == "standard input, a line: over the 1 MiB limit for one chat message", first
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_piped_line_that_is_not_utf8_is_named_by_its_line(tiny_models, tok, isolated_home):
    """QA: 'standard input is not valid UTF-8 (byte 3)' counted the byte within its line, not within stdin."""
    env = scripted_env(say(tok, "One.") + say(tok, "Two."))
    result = run_cli(
        "chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--jsonl", input=b"hi\nab\xffc\n", env=env
    )
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert records[1]["error"] == "standard input, line 2, is not valid UTF-8 (byte 2)", records
