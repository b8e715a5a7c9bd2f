"""Chat files: what the store writes it can read back, and files /load, --resume and `chats` refuse clearly."""

import json

import pytest

from tests.conftest import run_cli
from tests.test_chat import make_chat, reply, say, scripted_env

LONE_SURROGATE = '[{"role": "user", "content": "ok"}, {"role": "user", "content": "bad \\ud800 text"}]'


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


@pytest.fixture
def small_limit(monkeypatch):
    """A 4 KiB limit for a chat file, so a test needs no 16 MiB file."""
    from gptcli.textio import CHAT_FILE, Limit

    limit = Limit(4096, CHAT_FILE.kind, CHAT_FILE.hint)
    monkeypatch.setattr("gptcli.chat.conversation.CHAT_FILE", limit)
    return limit


def messages_file(path, count, message=None):
    """A plain JSON list of `count` short user messages, written compactly (as a /load file may be)."""
    path.write_text(json.dumps([message or {"role": "user", "content": "hi"}] * count, separators=(",", ":")))
    return path


def test_a_large_loaded_chat_is_saved_compact_and_reads_back(tok, tmp_path, small_limit):
    """Before, a /load file under the limit was saved as indented JSON over it, which nothing could read."""
    from gptcli.chat import ConversationStore, read_conversation_file, run_command

    path = messages_file(tmp_path / "big.json", 110)
    assert len(path.read_bytes()) < small_limit.max_bytes
    assert len(json.dumps(read_conversation_file(path).to_dict(), indent=2)) > small_limit.max_bytes
    chat = make_chat(tok, say(tok, "x"))
    assert run_command(chat, f"/load {path}").output.startswith("loaded 110 messages")
    stored = ConversationStore().path(chat.conversation.id)
    assert len(stored.read_bytes()) <= small_limit.max_bytes
    assert len(ConversationStore().load(chat.conversation.id).messages) == 110
    assert chat.save_error is None


def test_load_refuses_a_file_the_store_could_not_read_back(tok, tmp_path, small_limit):
    """Messages without content get `"content": ""` when saved: a file under the limit that grows over it."""
    from gptcli.chat import ConversationStore, run_command
    from gptcli.errors import InputError

    chat = make_chat(tok, say(tok, "Fine."))
    reply(chat.say("hello"))
    before = chat.conversation
    path = messages_file(tmp_path / "grows.json", 240, {"role": "user"})
    assert len(path.read_bytes()) < small_limit.max_bytes
    with pytest.raises(InputError, match=f"cannot load {path}: as saved, the conversation would be .* over the 4 KiB"):
        run_command(chat, f"/load {path}")
    assert chat.conversation is before  # the chat goes on as it was
    assert [c.id for c in ConversationStore().list()] == [before.id]  # nothing unreadable was written


def test_a_chat_at_the_limit_refuses_the_next_message_and_keeps_what_it_has(tok, small_limit):
    from gptcli.chat import ConversationStore
    from gptcli.errors import InputError

    warnings = []
    chat = make_chat(tok, say(tok, "Fine.") + say(tok, "b " * 60), warn=warnings.append, max_tokens=100, context=100000)
    reply(chat.say("a" * 1500))
    with pytest.raises(InputError, match="cannot add the message: as saved, the conversation would be"):
        chat.say("a" * 3000)
    assert len(chat.conversation.messages) == 2 and chat.save_error is None
    reply(chat.say("a" * 1900))  # fits, but its reply does not: warned about, the chat goes on unsaved
    assert len(chat.conversation.messages) == 4
    assert chat.save_error is not None and len(warnings) == 1 and "the chat goes on unsaved" in warnings[0]
    stored = ConversationStore().load(chat.conversation.id)  # what was saved stays readable
    assert [m["role"] for m in stored.messages] == ["user", "assistant", "user"]


def test_load_refuses_a_lone_surrogate_and_the_chat_goes_on(tiny_models, tok, tmp_path, isolated_home):
    """Before, saving the loaded chat failed and ended the session with a misleading stdout error (exit 1)."""
    bad = tmp_path / "bad.json"
    bad.write_text(LONE_SURROGATE)
    env = scripted_env(say(tok, "Fine."))
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input=f"/load {bad}\nHi\n", env=env)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert result.stdout.decode() == "Fine.\n"
    assert f"error: {bad}: message 2 holds U+D800, a lone surrogate" in err and "stdout" not in err
    assert "Traceback" not in err


def test_resume_show_and_list_refuse_a_stored_lone_surrogate(tiny_models, isolated_home):
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    store.root.mkdir(parents=True)
    store.path("20200101-000000-bad1").write_text(LONE_SURROGATE)
    (store.root / "20200101-000000-bad2.json").write_text('{"system": "\\udc80", "messages": []}')
    for args in (
        ["chat", "--resume", "20200101-000000-bad1", "-m", str(tiny_models["llama"])],
        ["chats", "show", "20200101-000000-bad1"],
    ):
        result = run_cli(*args)
        err = result.stderr.decode()
        assert result.returncode == 6, err
        assert err.startswith(f"error: {store.path('20200101-000000-bad1')}: message 2 holds U+D800"), err
        assert "Traceback" not in err
    shown = run_cli("chats", "show", "20200101-000000-bad2")
    assert shown.returncode == 6 and "holds U+DC80, a lone surrogate" in shown.stderr.decode()
    listing = run_cli("chats", "list", "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout) == []
    assert listing.stderr.decode().count("warning: skipped ") == 2


def test_load_of_a_folder_says_a_file_is_needed(tok, tmp_path):
    from gptcli.chat import run_command
    from gptcli.errors import InputError

    chat = make_chat(tok, say(tok, "x"))
    for folder in (tmp_path, tmp_path / "saved.json"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(InputError, match=f"^{folder} is a folder: /load needs a conversation file"):
            run_command(chat, f"/load {folder}")
