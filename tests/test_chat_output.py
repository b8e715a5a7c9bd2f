"""A chat's output format (--json-schema, --format json, --regex): kept in its file, resumed, changed by /format."""

from __future__ import annotations

import json
import re

import pytest

from gptcli.errors import UsageError
from tests.conftest import run_cli

DIGITS = "[0-9]{3}"


def chat(tiny_models, *args: str, lines: str):
    """`gptcli chat` on the tiny Llama, greedy, on a pipe: (stdout lines, stderr)."""
    run = run_cli("chat", "-m", str(tiny_models["llama"]), "-t", "0", "-n", "8", *args, input=lines)
    assert run.returncode == 0, run.stderr.decode()
    return run.stdout.decode().splitlines(), run.stderr.decode()


def saved(home) -> dict:
    (path,) = (home / "data" / "chats").glob("*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_resumed_chat_keeps_its_output_format_unless_a_flag_replaces_it(tiny_models, isolated_home):
    """`chat --continue` without the flag gave free replies: the chat file did not keep the format."""
    replies, _ = chat(tiny_models, "--regex", DIGITS, lines="hi\n")
    assert re.fullmatch(DIGITS, replies[0]), replies
    assert saved(isolated_home)["output"] == {"regex": DIGITS}
    replies, said = chat(tiny_models, "--continue", lines="/show\nagain\n")
    assert re.fullmatch(DIGITS, replies[0]), replies
    assert f"output             regex {DIGITS} (saved with the conversation)" in said  # what set it: its file
    replies, _ = chat(tiny_models, "--continue", "--format", "text", lines="again\n")  # a flag given now wins
    assert not re.fullmatch(DIGITS, replies[0]), replies
    assert "output" not in saved(isolated_home) and len(saved(isolated_home)["messages"]) == 6


def test_format_changes_or_clears_the_output_format_during_a_chat(tiny_models, isolated_home, tmp_path):
    schema = tmp_path / "bad.json"
    schema.write_text('{"type": "array", "uniqueItems": true}', encoding="utf-8")
    lines = f"/format regex [ab]{{4}}\nhi\n/format schema {schema}\n/format\n/format text\nhi\n/format yaml\n"
    replies, said = chat(tiny_models, lines=lines)
    assert re.fullmatch("[ab]{4}", replies[0]) and not re.fullmatch("[ab]{4}", replies[1]), replies
    assert said.splitlines()[:5] == [
        "output: regex [ab]{4} (/format regex)",  # what set it: /format, not --regex
        f"error: {schema}: JSON Schema keyword not supported: uniqueItems",
        "hint: see the README's Structured output section for the JSON Schema subset gptcli supports",
        "output: regex [ab]{4} (/format regex)",  # the bad schema changed nothing
        "output: free text",
    ], said
    assert "error: usage: /format text | json | schema FILE | regex PATTERN" in said
    assert "output" not in saved(isolated_home)


def test_a_chat_file_without_an_output_format_resumes_as_free_text(tiny_models, isolated_home, tmp_path):
    chats = isolated_home / "data" / "chats"
    chats.mkdir(parents=True)
    old = {"format": 1, "id": "20200101-000000-0ld1", "messages": [{"role": "user", "content": "hi"}]}
    (chats / "20200101-000000-0ld1.json").write_text(json.dumps(old), encoding="utf-8")
    copy = tmp_path / "copy.json"  # and /load takes a file's format with it
    copy.write_text(json.dumps({**old, "output": {"format": "json"}}), encoding="utf-8")
    lines = f"/format\nmore\n/load {copy}\n/format\n"
    replies, said = chat(tiny_models, "--resume", "20200101-000000-0ld1", lines=lines)
    assert replies and said.splitlines()[0] == "output: free text", said
    assert said.splitlines()[-1] == "output: any JSON (saved with the conversation)", said
    bad = {**old, "output": {"regex": ""}}
    (chats / "20200101-000000-0ld1.json").write_text(json.dumps(bad), encoding="utf-8")
    run = run_cli("chat", "-m", str(tiny_models["llama"]), "--resume", "20200101-000000-0ld1", input="x\n")
    assert run.returncode == 6 and "'output' must be" in run.stderr.decode(), run.stderr.decode()
    refused = {**old, "output": {"json_schema": {"type": "array", "uniqueItems": True}}}  # this version cannot
    (chats / "20200101-000000-0ld1.json").write_text(json.dumps(refused), encoding="utf-8")
    run = run_cli("chat", "-m", str(tiny_models["llama"]), "--resume", "20200101-000000-0ld1", input="x\n")
    said = run.stderr.decode()
    assert run.returncode == 3 and said.startswith(
        "error: conversation 20200101-000000-0ld1: its output format: JSON Schema keyword not supported: uniqueItems"
    ), said
    nothing = {**old, "output": {"json_schema": {"$ref": "#"}}}  # refused only against the vocabulary (QA)
    (chats / "20200101-000000-0ld1.json").write_text(json.dumps(nothing), encoding="utf-8")
    run = run_cli("chat", "-m", str(tiny_models["llama"]), "--resume", "20200101-000000-0ld1", input="x\n")
    assert run.stderr.decode().startswith(
        "error: conversation 20200101-000000-0ld1: its output format: invalid JSON Schema: it matches no text at all"
    ), run.stderr.decode()
    replies, _ = chat(tiny_models, "--resume", "20200101-000000-0ld1", "--format", "text", lines="x\n")
    assert replies  # a format given now replaces it (exit 0: chat() checks)


def test_a_resumed_regex_chat_is_refused_over_url_as_the_flag_is():
    """OpenAI's API has no regex format: `--regex --url` is a usage error, and so is resuming a regex chat there."""
    from gptcli.chat.conversation import Conversation
    from gptcli.chat.remote_session import RemoteChatSession
    from gptcli.config import OutputConstraint, Settings

    conversation = Conversation(id="c1", output=OutputConstraint("regex", DIGITS))
    with pytest.raises(UsageError, match=r"^conversation c1: its output format: a regex does not work with --url"):
        RemoteChatSession(None, None, Settings(), conversation)
