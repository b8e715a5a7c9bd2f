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


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"window_start": "abc"}, "'window_start' must be a message number from 0 to 2"),
        ({"window_start": 1000}, "'window_start' must be a message number from 0 to 2"),  # was: messages unsent
        ({"window_start": 1e400}, "'window_start' must be a message number"),  # was: OverflowError
        ({"sampling": "xyz"}, "'sampling' must be a mapping of settings"),
        ({"sampling": {"bogus": 1}}, "sampling.bogus: unknown sampling setting"),  # was: KeyError
        (
            {"sampling": {"temperature": "hot"}},
            ": sampling.temperature must be a number",
        ),  # was: blamed a --temperature flag
        ({"system": {"a": 1}}, "'system' must be text"),  # was: accepted, then the template failed
        ({"messages": [{"role": "user", "content": 5}]}, "message 1: its content must be text"),
        # was: "internal error: TypeError: unhashable type" (exit 1), and `chats list` failed on the one file
        (
            {"messages": [{"role": ["user"], "content": "Hi"}]},
            'message 1: its role must be user, assistant or system, got ["user"]',
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "x"}]},
            'message 2: its role must be user, assistant or system, got "tool"',
        ),
        ({"messages": [{"content": "Hi"}]}, "message 1: its role must be user, assistant or system, it has none"),
        # was: shown as "{'a': 1}" and sorted first by `chats list`, so `chat --continue` took this file
        ({"updated": {"a": 1}}, "'updated' must be a time stamp such as 20"),
        ({"updated": "yesterday"}, "'updated' must be a time stamp such as 20"),
        ({"created": 17}, "'created' must be a time stamp such as 20"),
    ],
)
def test_a_chat_file_with_a_wrong_value_is_refused_and_the_rest_go_on(tiny_models, tok, isolated_home, change, said):
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    store.root.mkdir(parents=True)
    good = {
        "id": "20200101-000000-good",
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    }
    store.path("20200101-000000-good").write_text(json.dumps(good))
    bad = store.path("20200101-000000-bad1")
    bad.write_text(json.dumps({**good, "id": "20200101-000000-bad1", **change}))
    shown = run_cli("chats", "show", "20200101-000000-bad1")
    err = shown.stderr.decode()
    assert shown.returncode == 6 and err.startswith(f"error: {bad}") and said in err.splitlines()[0], err
    listing = run_cli("chats", "list", "--json")
    assert listing.returncode == 0 and [c["id"] for c in json.loads(listing.stdout)] == ["20200101-000000-good"]
    env = scripted_env(say(tok, "Fine."))
    piped = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--jsonl", "-t", "0.5",
                    input=f"/load {bad}\nHi\n", env=env)  # fmt: skip
    assert piped.returncode == 0 and said in piped.stderr.decode()  # /load says why; the chat goes on
    [record] = [json.loads(line) for line in piped.stdout.decode().splitlines()]
    assert record["content"] == "Fine."
    saved = [json.loads(p.read_text()) for p in store.root.glob("*.json") if p not in (bad, store.path(good["id"]))]
    assert [c["messages"][0]["content"] for c in saved] == ["Hi"] and saved[0]["sampling"] == {}


@pytest.mark.parametrize(
    ("sampling", "said"),
    [
        ({"temperature": -1}, "sampling.temperature must be >= 0, got -1.0"),
        ({"temperature": "hot"}, "sampling.temperature must be a number, got 'hot'"),
        ({"tempreture": 1}, "sampling.tempreture: unknown sampling setting (did you mean 'temperature'?)"),
    ],
)
def test_a_chat_files_bad_sampling_setting_is_named_once(tmp_path, sampling, said):
    from gptcli.chat.conversation import read_conversation_file
    from gptcli.errors import InputError

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"messages": [], "sampling": sampling}))
    with pytest.raises(InputError) as caught:  # was: "bad.json: sampling.temperature: sampling.temperature must be"
        read_conversation_file(path)
    assert caught.value.message == f"{path}: {said}"
    assert caught.value.hint == "fix or remove that setting in the file"


def test_per_request_sampling_options_are_not_config_file_settings(tmp_path):
    cfg = tmp_path / "lp.yaml"
    cfg.write_text("sampling:\n  logprobs: 3\n")
    result = run_cli("config", "show", "-c", str(cfg))
    err = result.stderr.decode()
    assert result.returncode == 3 and err.startswith(f"error: {cfg}: sampling -> logprobs: unknown key"), err


def test_a_pipe_in_the_chats_or_templates_folder_is_skipped_not_waited_for(isolated_home):
    import os

    from gptcli.chat import ConversationStore
    from gptcli.templates import user_templates_dir

    store = ConversationStore()
    store.root.mkdir(parents=True)
    os.mkfifo(store.path("20240101-000000-fifo"))
    templates = user_templates_dir()
    templates.mkdir(parents=True)
    os.mkfifo(templates / "stuck.yaml")
    listing = run_cli("chats", "list", "--json", timeout=60)  # was: blocked forever on the FIFO
    assert listing.returncode == 0 and json.loads(listing.stdout) == []
    assert "is a pipe or a device, not a saved chat" in listing.stderr.decode()
    shown = run_cli("chats", "show", "20240101-000000-fifo", timeout=60)
    assert shown.returncode == 6 and "is a pipe or a device, not a saved chat" in shown.stderr.decode()
    assert run_cli("templates", "list", timeout=60).returncode == 0


def test_a_file_where_the_chats_folder_goes_is_an_error_not_an_empty_list(isolated_home):
    """`chats list` said "no saved conversations yet" (exit 0), though no chat could be saved there."""
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    store.root.parent.mkdir(parents=True, exist_ok=True)
    store.root.write_text("not a folder")
    for command in (("chats", "list"), ("chats", "list", "--json"), ("chats", "show", "x")):
        done = run_cli(*command, timeout=60)
        err = done.stderr.decode()
        assert done.returncode == 1 and err.startswith(f"error: {store.root} is not a folder"), (command, err)
        assert done.stdout == b""


def test_chats_rm_of_a_folder_in_the_chats_folder_says_it_is_not_a_chat(isolated_home):
    """It was "cannot write <folder>: Is a directory" with a hint to make GPTCLI_HOME writable (exit 1)."""
    from gptcli.chat import ConversationStore
    from gptcli.errors import InputError

    store = ConversationStore()
    folder = store.path("20240101-000000-dir0")
    (folder / "inside").mkdir(parents=True)
    with pytest.raises(InputError, match=r"dir0\.json is a folder, not a saved chat"):
        store.delete("20240101-000000-dir0")
    assert (folder / "inside").is_dir()  # nothing of it was removed


def test_two_chats_on_one_conversation_lose_neither_ones_messages(isolated_home):
    """Two `gptcli chat --resume ID` at once: the second to save overwrote the first one's messages."""
    from gptcli.chat import Conversation, ConversationStore

    first, second = ConversationStore(), ConversationStore()  # two processes
    first.save(Conversation(id="20240101-000000-both", messages=[{"role": "user", "content": "start"}]))
    mine, theirs = first.load("20240101-000000-both"), second.load("20240101-000000-both")
    theirs.messages.append({"role": "user", "content": "from the other chat"})
    second.save(theirs)
    mine.messages.append({"role": "user", "content": "from this chat"})
    path = first.save(mine)
    assert mine.id != "20240101-000000-both" and path == first.path(mine.id)  # saved on under a new id
    contents = {cv.id: [m["content"] for m in cv.messages] for cv in ConversationStore().list()}
    assert contents == {
        "20240101-000000-both": ["start", "from the other chat"],
        mine.id: ["start", "from this chat"],
    }
    mine.messages.append({"role": "user", "content": "more"})
    assert first.save(mine) == path  # its own file now: saved in place


def test_continue_names_a_chat_file_it_could_not_read(tiny_models, tok, isolated_home):
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    store.root.mkdir(parents=True)
    older = {
        "id": "20200101-000000-old1",
        "updated": "2020-01-01T00:00:00",
        "messages": [{"role": "user", "content": "Hi"}],
    }
    store.path(older["id"]).write_text(json.dumps(older))
    store.path("20990101-000000-torn").write_text('{"messages": [{"role": "user", "con')
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--continue", "--jsonl",
                     input="Again\n", env=scripted_env(say(tok, "Yes.")))  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert f"warning: skipped cannot read {store.path('20990101-000000-torn')}" in result.stderr.decode()


def test_chats_list_sorts_by_time_not_by_the_text_of_the_time_stamps(isolated_home):
    """Sorted as text, a time stamp in another zone or form came before a later one."""
    from gptcli.chat import ConversationStore

    store = ConversationStore()
    store.root.mkdir(parents=True)
    for conv_id, updated in (("a", "2024-05-01T12:00:00+0000"), ("b", "2024-05-01T11:00:00-0300")):
        store.path(conv_id).write_text(json.dumps({"updated": updated, "messages": []}))
    assert [c.id for c in store.list()] == ["b", "a"]  # 14:00 UTC, then 12:00 UTC


def test_chats_list_shows_a_servers_model_name_and_a_pasted_title_as_text(isolated_home):
    # A model id from `chat --url` (the server's) and a first message went into the table raw: a terminal acted
    # on what they held.
    from gptcli.chat import ConversationStore
    from gptcli.chat.conversation import Conversation

    store = ConversationStore()
    messages = [{"role": "user", "content": "look \x1b[2Jhere"}, {"role": "assistant", "content": "ok"}]
    store.save(Conversation(model="m\x1b]0;pwned\x07", messages=messages))
    listing = run_cli("chats", "list")
    out = listing.stdout.decode()
    assert listing.returncode == 0 and "\x1b" not in out and "\x07" not in out
    assert "m\\x1b]0;pwned\\x07" in out and "look \\x1b[2Jhere" in out
