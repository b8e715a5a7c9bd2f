"""Chat core: turns, context reuse between turns, trimming, saving, slash commands; chat through pipes."""

import json
import os
import stat

import pytest

from tests.conftest import run_cli
from tests.scripted import ScriptedBackend

SCRIPTED = {"GPTCLI_BACKEND_PATHS": "scripted=tests.scripted:ScriptedBackend"}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def say(tok, text):
    """Token ids that make the scripted backend answer `text` then stop (one forward call per id)."""
    return [*tok.encode(text, add_special_tokens=False), min(tok.eos_ids)]


def make_chat(tok, script, *, context=4096, system=None, store=True, warn=None, max_tokens=64):
    from gptcli.chat import ChatSession, Conversation, ConversationStore
    from gptcli.config import SamplingConfig, Settings

    backend = ScriptedBackend(script, tok.vocab_size, context)
    settings = Settings(model="tiny", sampling=SamplingConfig(temperature=0, max_tokens=max_tokens))
    conv = Conversation(model="tiny", system=system)
    return ChatSession(
        backend, tok, settings, conv, ConversationStore() if store else None, warn=warn or (lambda _: None)
    )


def reply(turn):
    from gptcli.decoding import Token

    return "".join(e.text for e in turn if isinstance(e, Token))


def test_two_turns_reuse_the_context(tok):
    chat = make_chat(tok, say(tok, "Hello there.") + say(tok, "You said hi."), system="Be brief.")
    assert reply(chat.say("hi")) == "Hello there."
    first_calls = len(chat.backend.calls)
    assert reply(chat.say("What did I say?")) == "You said hi."
    # The second turn's prefill is only the new suffix, not the whole history.
    second_prefill = chat.backend.calls[first_calls]
    full = chat.fit()
    assert chat.last_stats.cached_tokens > 0
    assert len(second_prefill) == chat.last_stats.prompt_tokens - chat.last_stats.cached_tokens
    assert len(second_prefill) < len(full) // 2
    roles = [m["role"] for m in chat.conversation.messages]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_no_reuse_prefills_everything(tok):
    chat = make_chat(tok, say(tok, "A.") + say(tok, "B."))
    chat.reuse_context = False
    reply(chat.say("one"))
    reply(chat.say("two"))
    assert chat.last_stats.cached_tokens == 0


def test_real_tiny_model_reuse_matches_full_prefill(tiny_models, tok):
    """With the torch backend, a reused cache gives the same greedy reply as prefilling everything."""
    from gptcli.backends.base import LoadOptions
    from gptcli.backends.torch_backend import TorchBackend
    from gptcli.chat import ChatSession, Conversation
    from gptcli.config import SamplingConfig, Settings

    backend = TorchBackend.load(tiny_models["llama"], LoadOptions(device="cpu", dtype="float32"))
    settings = Settings(sampling=SamplingConfig(temperature=0, max_tokens=6))
    replies = {}
    for reuse in (True, False):
        chat = ChatSession(backend, tok, settings, Conversation(model="tiny"), None, reuse_context=reuse)
        replies[reuse] = [reply(chat.say("Once")), reply(chat.say("The capital"))]
        if reuse:
            assert chat.last_stats.cached_tokens > 0
    assert replies[True] == replies[False]


def test_saved_after_each_turn_atomically_with_mode_0600(tok, isolated_home):
    chat = make_chat(tok, say(tok, "Paris."))
    turn = chat.say("Capital of France?")
    path = isolated_home / "data" / "chats" / f"{chat.conversation.id}.json"
    saved = json.loads(path.read_text())  # the user message is on disk before the reply starts
    assert [m["role"] for m in saved["messages"]] == ["user"]
    assert reply(turn) == "Paris."
    saved = json.loads(path.read_text())
    assert saved["messages"][-1]["content"] == "Paris." and saved["messages"][-1]["stats"]["new_tokens"] > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left behind


def test_interrupted_turn_keeps_partial_reply(tok):
    chat = make_chat(tok, say(tok, "one two three four five"))
    turn = chat.say("count")
    events = iter(turn)
    next(events)
    next(events)
    turn.close()  # what the REPL does when Ctrl-C lands between events
    last = chat.conversation.messages[-1]
    assert last["role"] == "assistant" and last["interrupted"] is True
    assert last["content"] and "five" not in last["content"]


def test_context_overflow_drops_oldest_exchanges_not_the_system(tok):
    warnings = []
    script = []
    for i in range(12):
        script += say(tok, f"Reply number {i} is here.")
    chat = make_chat(tok, script, context=120, system="Be brief.", warn=warnings.append, max_tokens=20)
    for i in range(12):
        reply(chat.say(f"Question number {i} please?"))
        assert chat.prompt_tokens <= 120 - chat.reserve()
    assert chat.conversation.window_start > 0
    assert len(warnings) == 1  # said once
    window = chat.conversation.window()
    assert window[0] == {"role": "system", "content": "Be brief."}
    assert window[1]["role"] == "user" and "Question number 0" not in window[1]["content"]
    assert len(chat.conversation.messages) == 24  # nothing is lost from the saved transcript
    from gptcli.chat import show_text

    assert "oldest messages no longer sent" in show_text(chat)


def test_message_longer_than_context_is_refused_and_forgotten(tok):
    from gptcli.errors import InputError

    chat = make_chat(tok, say(tok, "x"), context=64, max_tokens=8)
    with pytest.raises(InputError, match="the context holds 64") as info:
        chat.say("word " * 200)
    assert chat.conversation.messages == []
    assert info.value.hint == "shorten it"  # was: "..., or lower max_tokens with /set max_tokens N": no N helps


def test_a_message_that_fits_with_a_shorter_reply_names_the_max_tokens_that_makes_room(tok):
    from gptcli.chat import run_command
    from gptcli.errors import InputError

    chat = make_chat(tok, say(tok, "x"), context=64, max_tokens=32)
    message = "word " * 5
    with pytest.raises(InputError, match="with 32 kept for the reply") as info:
        chat.say(message)
    setting = info.value.hint.removeprefix("shorten it, or lower max_tokens with ")
    assert setting.startswith("/set max_tokens ")
    run_command(chat, setting)
    reply(chat.say(message))  # what the hint said makes room for it


def test_slash_commands(tok, tmp_path):
    from gptcli.chat import collect_message, read_conversation_file, run_command
    from gptcli.errors import UsageError

    chat = make_chat(tok, say(tok, "First.") + say(tok, "Second.") + say(tok, "Again."))
    assert "/retry" in run_command(chat, "/help").output
    assert run_command(chat, "/set temperature 0.4").output == "temperature = 0.4"
    assert chat.settings.sampling.temperature == 0.4
    assert run_command(chat, "/set seed none").output == "seed = none"  # as /set takes it (it said None)
    assert run_command(chat, "/set stop a,b").output == "stop = a, b"  # was the tuple's repr: ('a', 'b')
    assert run_command(chat, "/set stop none").output == "stop = none"  # none again, as for seed
    with pytest.raises(UsageError, match="unknown setting 'temprature' \\(did you mean 'temperature'\\?\\)"):
        run_command(chat, "/set temprature 1")
    with pytest.raises(UsageError, match=r"^/set: sampling\.top_p must be in \(0, 1\]"):
        run_command(chat, "/set top_p 2")
    with pytest.raises(UsageError, match="unknown command /nope"):
        run_command(chat, "/nope")
    run_command(chat, "/system You are terse.")
    assert chat.conversation.system == "You are terse."
    run_command(chat, "/set temperature 0")
    reply(chat.say("one"))
    reply(chat.say("two"))
    assert "2 new tok" not in run_command(chat, "/stats").output and "TTFT" in run_command(chat, "/stats").output
    assert run_command(chat, "/retry").action == "retry"
    assert reply(chat.retry()) == "Again."
    assert [m["content"] for m in chat.conversation.messages] == ["one", "First.", "two", "Again."]
    run_command(chat, "/undo")
    assert [m["content"] for m in chat.conversation.messages] == ["one", "First."]
    show = run_command(chat, "/show").output
    assert "tokens" in show and "left of 4096" in show and "temperature        0.0" in show
    assert "output             free text" in show
    assert "repetition_stop    True\n" in show  # it applies here (a --url chat says it does not)
    assert "reused from the last turn)" in run_command(chat, "/stats").output
    md, js = tmp_path / "c.md", tmp_path / "c.json"
    run_command(chat, f"/save {md}")
    run_command(chat, f"/save {js}")
    assert "### You" in md.read_text() and "First." in md.read_text()
    assert read_conversation_file(js).messages[1]["content"] == "First."
    with pytest.raises(UsageError, match="cannot tell the format"):
        run_command(chat, f"/save {tmp_path / 'c.txt'}")
    old_id = chat.conversation.id
    run_command(chat, "/reset")
    assert chat.conversation.messages == [] and chat.conversation.id != old_id
    out = run_command(chat, f"/load {js}").output
    assert out.startswith("loaded 2 messages") and chat.conversation.system == "You are terse."
    assert run_command(chat, "/exit").action == "exit"
    lines = iter(["second line", 'end"""'])
    assert collect_message('"""first', lambda: next(lines, None)) == "first\nsecond line\nend"
    assert collect_message('"""one line"""', lambda: None) == "one line"


def test_save_replaces_only_its_own_files(tok, tmp_path):
    """/save never overwrites a file the user made: only an earlier save of this conversation, or a
    file this chat saved or loaded."""
    from gptcli.chat import run_command
    from gptcli.errors import InputError

    chat = make_chat(tok, say(tok, "First."))
    reply(chat.say("one"))
    notes = tmp_path / "notes.md"
    notes.write_text("my own notes\n")
    with pytest.raises(InputError, match=r"notes\.md already exists and is not a save of this conversation"):
        run_command(chat, f"/save {notes}")
    assert notes.read_text() == "my own notes\n"
    md, js = tmp_path / "c.md", tmp_path / "c.json"
    run_command(chat, f"/save {md}")
    run_command(chat, f"/save {js}")
    run_command(chat, f"/save {md}")  # an earlier save of this conversation: replaced
    other = make_chat(tok, say(tok, "Other."))  # another chat may not replace this one's files
    reply(other.say("two"))
    with pytest.raises(InputError, match=r"c\.md already exists and is not a save of this conversation"):
        run_command(other, f"/save {md}")
    run_command(chat, "/reset")  # the old conversation stays in the store: this chat's file may take the new one
    run_command(chat, f"/save {md}")
    run_command(chat, f"/load {js}")  # continued under a new id: the file it came from may be written back
    assert run_command(chat, f"/save {js}").output.startswith("saved json")


def test_store_list_resolve_and_delete(tok):
    from gptcli.chat import ConversationStore
    from gptcli.errors import InputError

    store = ConversationStore()
    with pytest.raises(InputError, match="no saved conversation to continue"):
        store.latest()
    chat = make_chat(tok, say(tok, "ok"))
    reply(chat.say("hello"))
    conv_id = chat.conversation.id
    assert store.latest().id == conv_id
    assert store.load(conv_id[:10]).messages[0]["content"] == "hello"
    assert store.delete(conv_id) == conv_id
    with pytest.raises(InputError, match="no saved conversation"):
        store.load(conv_id)


def test_a_chat_whose_file_another_chat_changed_is_saved_on_under_a_new_id(tok):
    from gptcli.chat import ConversationStore

    warnings: list[str] = []
    chat = make_chat(tok, say(tok, "one") + say(tok, "two"), warn=warnings.append)
    reply(chat.say("hello"))
    first_id = chat.conversation.id
    other = ConversationStore()  # another `gptcli chat --resume` of it, which answered meanwhile
    theirs = other.load(first_id)
    theirs.messages.append({"role": "user", "content": "elsewhere"})
    other.save(theirs)
    reply(chat.say("again"))
    assert warnings == [f"another gptcli chat changed {first_id}: this chat is saved on as {chat.conversation.id}"]
    assert [m["content"] for m in other.load(first_id).messages] == ["hello", "one", "elsewhere"]
    assert [m["content"] for m in other.load(chat.conversation.id).messages] == ["hello", "one", "again", "two"]


def test_a_file_put_in_the_store_by_hand_keeps_its_name_and_its_time(tok):
    """A plain JSON list (what /load accepts) copied into the chats folder: before, it was listed under a
    new random id on every read (so `chats show` could not find it) and dated "now" (so it was always the
    conversation `chat --continue` picked)."""
    import os

    from gptcli.chat import ConversationStore

    store = ConversationStore()
    chat = make_chat(tok, say(tok, "ok"))
    reply(chat.say("hello"))
    store.root.joinpath("20200101-000000-cafe.json").write_text('[{"role": "user", "content": "by hand"}]')
    os.utime(store.root / "20200101-000000-cafe.json", (1577836800, 1577836800))  # 2020-01-01
    assert [c.id for c in store.list()] == [chat.conversation.id, "20200101-000000-cafe"]
    assert store.load("20200101-000000-cafe").messages[0]["content"] == "by hand"
    assert store.latest().id == chat.conversation.id


def scripted_env(script, **extra):
    return {**SCRIPTED, "GPTCLI_TEST_SCRIPT": json.dumps(script), "GPTCLI_TEST_CONTEXT": "4096", **extra}


def test_piped_chat_one_turn_per_line(tiny_models, tok, isolated_home):
    env = scripted_env(say(tok, "Hi!") + say(tok, "You said Hi."))
    result = run_cli(
        "chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="Hi\n\nWhat did I just say?\n", env=env
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == "Hi!\nYou said Hi.\n"
    saved = list((isolated_home / "data" / "chats").glob("*.json"))
    assert len(saved) == 1
    messages = json.loads(saved[0].read_text())["messages"]
    assert [m["content"] for m in messages] == ["Hi", "Hi!", "What did I just say?", "You said Hi."]

    # --continue resumes it; the new reply sees the whole history (the prompt grows).
    env = scripted_env(say(tok, "Still here."))
    again = run_cli(
        "chat", "--continue", "-m", str(tiny_models["llama"]), "-b", "scripted", input="/show\nMore\n", env=env
    )
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode() == "Still here.\n"  # /show output goes to stderr on a pipe
    assert "4 messages" in again.stderr.decode()
    assert "chat template      the model's\n" in again.stderr.decode()  # the tiny Llama has its own
    messages = json.loads(saved[0].read_text())["messages"]
    assert len(messages) == 6


def test_piped_chat_bad_command_goes_on_and_resume_errors(tiny_models, tok):
    env = scripted_env(say(tok, "Fine."))
    result = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="/bogus\nHello\n", env=env)
    assert result.returncode == 0
    assert result.stdout.decode() == "Fine.\n"
    assert "error: unknown command /bogus" in result.stderr.decode()
    missing = run_cli("chat", "--resume", "nope", env=env)
    assert missing.returncode == 6 and "error: no saved conversation 'nope'" in missing.stderr.decode()
    both = run_cli("chat", "--resume", "x", "--continue")
    assert both.returncode == 2


def test_resume_of_an_empty_id_is_an_error_not_a_new_chat(tiny_models, tok, isolated_home):
    """`chat --resume "$ID"` with $ID empty started a new conversation, exit 0, as if no --resume was given."""
    env = scripted_env(say(tok, "Fine."))
    run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="Hello\n", env=env)
    saved = os.listdir(isolated_home / "data" / "chats")
    empty = run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", "--resume", "", input="Hi\n", env=env)
    assert empty.returncode == 2 and empty.stdout == b""  # a usage error (it was exit 6, as an unknown id)
    assert "an empty conversation id" in empty.stderr.decode().splitlines()[0]
    assert os.listdir(isolated_home / "data" / "chats") == saved  # no new conversation either
    assert run_cli("chat", "--resume", "", "--continue").returncode == 2


def test_continue_of_a_chat_whose_model_folder_is_gone_names_the_conversation(tiny_models, tok, tmp_path):
    """It said only "no such file or folder: PATH, hint: check the path", a path the user did not give."""
    import shutil

    env = scripted_env(say(tok, "Fine."))
    model = tmp_path / "moved-model"
    shutil.copytree(tiny_models["llama"], model)
    assert run_cli("chat", "-m", str(model), "-b", "scripted", input="Hello\n", env=env).returncode == 0
    shutil.rmtree(model)
    gone = run_cli("chat", "--continue", "-b", "scripted", input="Hi\n", env=env)
    [conv_id] = [p.stem for p in (tmp_path / "gptcli-home" / "data" / "chats").glob("*.json")]
    assert gone.returncode == 5 and gone.stderr.decode().splitlines() == [
        f"error: conversation {conv_id}'s model: no such file or folder: {model}",
        "hint: check the path, or continue it with another model: --model NAME",
    ]
    other = run_cli("chat", "--continue", "-m", str(tiny_models["llama"]), "-b", "scripted", input="Hi\n", env=env)
    assert other.returncode == 0 and other.stdout.decode() == "Fine.\n"


def test_chats_list_show_export_rm(tiny_models, tok, isolated_home):
    env = scripted_env(say(tok, "**Bold** answer."))
    run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="Question?\n", env=env)
    listing = json.loads(run_cli("chats", "list", "--json").stdout)
    assert len(listing) == 1 and listing[0]["title"] == "Question?" and listing[0]["messages"] == 2
    conv_id = listing[0]["id"]
    shown = run_cli("chats", "show", conv_id).stdout.decode()
    assert "### You\n\nQuestion?" in shown and "**Bold** answer." in shown
    exported = json.loads(run_cli("chats", "export", conv_id, "--format", "json").stdout)
    assert exported["messages"][1]["content"] == "**Bold** answer."
    assert run_cli("chats", "export", conv_id, "--format", "xml").returncode == 2
    assert run_cli("chats", "rm", conv_id).returncode == 0
    assert json.loads(run_cli("chats", "list", "--json").stdout) == []
    gone = run_cli("chats", "show", conv_id)
    assert gone.returncode == 6 and gone.stderr.decode().startswith("error: no saved conversation")
    assert not os.listdir(isolated_home / "data" / "chats")


def test_chats_export_keeps_a_file_that_is_there_unless_forced(tmp_path, capsys):
    from gptcli.chat import Conversation, ConversationStore
    from gptcli.cli.app import run

    conv = Conversation(messages=[{"role": "user", "content": "hi"}])
    ConversationStore().save(conv)
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    assert run(["chats", "export", conv.id, "-o", str(notes)]) == 6  # it was replaced without a word
    assert notes.read_text() == "my notes\n"
    assert f"error: {notes} already exists" in capsys.readouterr().err
    assert run(["chats", "export", conv.id, "-o", str(notes), "--force"]) == 0 and "hi" in notes.read_text()
    empty = tmp_path / "empty.md"
    empty.touch()  # as generate --batch -o: a new or empty file
    assert run(["chats", "export", conv.id, "-o", str(empty)]) == 0 and "hi" in empty.read_text()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_chats_export_into_a_folder_that_takes_no_files_names_the_file(capsys):
    from gptcli.chat import Conversation, ConversationStore
    from gptcli.cli.app import run

    conv = Conversation(messages=[{"role": "user", "content": "hi"}])
    ConversationStore().save(conv)
    # the temporary file beside the target failed: it was "cannot write /proc: No such file or directory"
    assert run(["chats", "export", conv.id, "-o", "/proc/x.md"]) == 6
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: cannot write /proc/x.md: cannot create a file in /proc (No such file or directory)"]


def test_one_dispatch_for_commands_messages_and_retry(tok):
    from gptcli.chat import dispatch

    chat = make_chat(tok, say(tok, "First.") + say(tok, "Again."))
    help_step = dispatch(chat, "/help")
    assert "/retry" in help_step.output and help_step.turn is None and not help_step.exit
    assert reply(dispatch(chat, "one").turn) == "First."
    retry = dispatch(chat, "/retry")
    assert reply(retry.turn) == "Again."
    assert [m["content"] for m in chat.conversation.messages] == ["one", "Again."]
    assert dispatch(chat, "/exit").exit


def test_plain_transcript_for_a_model_without_a_chat_template(tok):
    from gptcli.prompts import build_prompt, transcript

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "again"},
    ]
    assert transcript(messages) == "Be brief.\nUser: hi\nAssistant: Hello.\nUser: again\nAssistant:"
    prompt = build_prompt(tok, messages, raw=True, plain=transcript)
    assert not prompt.templated
    assert prompt.ids == tok.encode(transcript(messages), add_special_tokens=True)


def test_a_transcript_reply_keeps_the_space_the_model_wrote_and_adds_none(tok):
    """A base model writes " Hi" after "Assistant:"; the next turn wrote "Assistant:  Hi" (two spaces) and the
    model copied the indentation, one more space each turn. The next prompt now reads on from this one."""
    from gptcli.prompts import transcript

    asked = [{"role": "user", "content": "Hi, my name is Bob."}]
    said = " Hi, I'm Bob."  # what the model wrote after "Assistant:"
    following = transcript([*asked, {"role": "assistant", "content": said}, {"role": "user", "content": "And?"}])
    assert following == "User: Hi, my name is Bob.\nAssistant: Hi, I'm Bob.\nUser: And?\nAssistant:"
    assert following.startswith(transcript(asked) + said)  # text (and so the cache) carry on
    typed = transcript([{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "\nfoo"}])
    assert typed == "Assistant: Hello.\nUser:\nfoo\nAssistant:"  # text without a space gets one; none doubles


def test_undo_of_the_only_exchange_leaves_no_saved_copy(tok, isolated_home):
    from gptcli.chat import ConversationStore, run_command

    chat = make_chat(tok, say(tok, "Noted."))
    reply(chat.say("Secret I regret typing"))
    path = ConversationStore().path(chat.conversation.id)
    assert path.is_file()
    run_command(chat, "/undo")
    assert chat.conversation.messages == [] and not path.exists()  # was: kept, and --continue brought it back


def test_undo_keeps_the_file_when_another_chat_on_it_answered_meanwhile(tok, isolated_home):
    """/undo of the only exchange deleted the file, with the messages another `chat --resume` of it had saved."""
    from gptcli.chat import ConversationStore, run_command

    chat = make_chat(tok, say(tok, "Noted."))
    reply(chat.say("first"))
    other = ConversationStore()
    theirs = other.load(chat.conversation.id)
    theirs.messages.append({"role": "user", "content": "from the other chat"})
    other.save(theirs)
    run_command(chat, "/undo")
    assert [m["content"] for m in other.load(theirs.id).messages] == ["first", "Noted.", "from the other chat"]


def test_fitting_a_long_chat_takes_a_few_encodings_not_one_per_exchange(tok):
    chat = make_chat(tok, say(tok, "Ok."), context=512, store=False, max_tokens=16)
    for i in range(2000):
        chat.conversation.messages += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    chat.conversation.messages.append({"role": "user", "content": "last"})
    calls = []
    real = chat.encode_window
    chat.encode_window = lambda *args: calls.append(1) or real(*args)
    ids = chat.fit()
    assert len(ids) <= 512 - 16 and len(calls) <= 16  # was: one re-encoding of the whole window per dropped exchange
    window = chat.conversation.window()
    assert window[-1]["content"] == "last"
    chat.conversation.window_start -= 2  # one exchange more would not have fitted: the window is the longest that fits
    assert len(chat.encode_window()) > 512 - 16


def test_a_base_models_reply_ends_where_it_would_write_the_users_turn(tiny_models):
    """Without a chat template the chat is a transcript: the model went on with 'User: ...' and answered itself."""
    from gptcli.tokenizer import Tokenizer

    base = Tokenizer(tiny_models["gpt2"])
    assert not base.chat_template
    chat = make_chat(base, say(base, "Hi there.\nUser: and who am I?\nAssistant: you."))
    assert reply(chat.say("hello")) == "Hi there."
    assert chat.conversation.messages[-1]["content"] == "Hi there."
    assert chat.settings.sampling.stop == ()  # the user's own settings are unchanged


def test_show_names_the_output_format_a_structured_chat_follows(tok):
    """`/show` listed every setting but the one that shapes every reply (--json-schema, --format json, --regex)."""
    from dataclasses import replace

    from gptcli.chat import run_command
    from gptcli.chat.commands import format_flag
    from gptcli.config import OutputConstraint

    chat = make_chat(tok, say(tok, "ok"))
    for constraint, said in (
        (OutputConstraint("json"), "any JSON (--format json)"),
        (OutputConstraint("regex", "(yes|no)"), "regex (yes|no) (--regex)"),
        (OutputConstraint("json_schema", '{"type": "object",\n "properties": {}}'), 'JSON Schema {"type": "object",'),
    ):
        chat.settings = replace(chat.settings, sampling=replace(chat.settings.sampling, constraint=constraint))
        chat.output_source = format_flag(constraint)  # as `gptcli chat` sets it for a flag
        assert f"output             {said}" in run_command(chat, "/show").output


def test_show_names_what_set_the_output_format_a_flag_format_or_the_chat_file(tok, tmp_path):
    """`/format grammar FILE` (and every other /format KIND) was shown as set by its flag: `(--grammar)`."""
    from gptcli.chat import run_command

    grammar = tmp_path / "yes-no.lark"
    grammar.write_text('start: "yes" | "no"\n', encoding="utf-8")
    chat = make_chat(tok, say(tok, "ok"))
    shown = {arg: run_command(chat, f"/format {arg}").output for arg in (f"grammar {grammar}", "regex [ab]+", "json")}
    assert list(shown.values()) == [
        'output: grammar start: "yes" | "no" (/format grammar)',
        "output: regex [ab]+ (/format regex)",
        "output: any JSON (/format json)",
    ]
    assert "output             any JSON (/format json)" in run_command(chat, "/show").output
    run_command(chat, "/reset")  # a new conversation keeps the format, and what set it
    assert run_command(chat, "/format").output == "output: any JSON (/format json)"


def test_show_after_a_long_reply_counts_what_the_next_turn_sends(tok):
    """A reply that filled the context made /show say '224 used / 0 left of 128': it counted the window the next
    turn trims; it now counts what that turn sends before the message, and says what the turn drops."""
    from gptcli.chat import show_text

    long_reply = say(tok, "word " * 60)
    chat = make_chat(tok, say(tok, "Hello.") + long_reply + say(tok, "Fine."), context=128, max_tokens=1000)
    reply(chat.say("Hi"))
    reply(chat.say("More"))
    assert len(chat.encode_window()) > 128 - chat.reserve()  # the window as it stands would not fit
    used, left = chat.budget()
    assert used + left == 128 and used <= 128 - chat.reserve()
    show = show_text(chat)
    assert f"tokens             {used} used / {left} left of 128 (up to 1000 per reply)" in show
    assert "trimmed            none; the next message drops the oldest 4 (no room for them)" in show
    reply(chat.say("ok"))
    assert chat.conversation.window_start == 4 and used <= chat.prompt_tokens <= 128 - chat.reserve()
    assert "trimmed            4 oldest messages no longer sent to the model" in show_text(chat)


def test_system_none_clears_the_system_message(tok, isolated_home):
    """`/system none` set the system message "none": there was no way to clear it mid-chat."""
    from gptcli.chat import ConversationStore, run_command

    chat = make_chat(tok, say(tok, "Yes.") + say(tok, "No."), system="Be brief.")
    reply(chat.say("One?"))
    assert run_command(chat, "/system None").output == "system message cleared"
    assert chat.conversation.system is None and run_command(chat, "/system").output == "system: -"
    reply(chat.say("Two?"))
    assert chat.conversation.window()[0] == {"role": "user", "content": "One?"}  # the next turn sends none
    assert ConversationStore().load(chat.conversation.id).system is None


def test_two_chats_saving_one_conversation_at_the_same_moment_lose_neither_turn(isolated_home, monkeypatch):
    """QA: a save's check (the file is as this chat last saw it) and its write were not one step: another chat's
    save that came between them was overwritten (its turn lost, exit 0, no warning). The store's lock makes them
    one. Here the other save is started inside this one's window, deterministically."""
    import threading

    import gptcli.chat.conversation as conversation
    from gptcli.chat import Conversation, ConversationStore

    mine, theirs = ConversationStore(), ConversationStore()
    conv = Conversation(messages=[{"role": "user", "content": "base"}])
    mine.save(conv)
    other = theirs.load(conv.id)
    conv.messages.append({"role": "user", "content": "mine"})
    other.messages.append({"role": "user", "content": "theirs"})
    real = conversation.write_atomic
    racing: list[threading.Thread] = []

    def write_with_a_rival(path, payload, **kwargs):
        if not racing:  # this chat's write: the other chat saves now, between the check and the write
            racing.append(threading.Thread(target=theirs.save, args=(other,)))
            racing[0].start()
            racing[0].join(0.5)  # it waits for the lock (before: it wrote at once, and was overwritten below)
        real(path, payload, **kwargs)

    monkeypatch.setattr(conversation, "write_atomic", write_with_a_rival)
    mine.save(conv)
    racing[0].join(15)
    saved = {c.id: [m["content"] for m in c.messages] for c in ConversationStore().list()}
    assert saved[conv.id] == ["base", "mine"]
    assert other.id != conv.id and saved[other.id] == ["base", "theirs"]  # saved on under a new id


def test_chats_export_does_not_replace_a_file_another_export_made_meanwhile(tiny_models, tok, isolated_home, tmp_path):
    """QA: two `chats export -o F` at once both passed the "already exists" check and both wrote F (exit 0)."""
    from gptcli.chat import ConversationStore
    from gptcli.cli.app import run

    env = scripted_env(say(tok, "An answer."))
    run_cli("chat", "-m", str(tiny_models["llama"]), "-b", "scripted", input="Question?\n", env=env)
    conv_id = json.loads(run_cli("chats", "list", "--json").stdout)[0]["id"]
    out = tmp_path / "exp.md"
    real = ConversationStore.load

    def load_while_another_export_writes(self, ref):
        out.write_text("the other export")
        return real(self, ref)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(ConversationStore, "load", load_while_another_export_writes)
        assert run(["chats", "export", conv_id, "--format", "md", "-o", str(out)]) == 6
    assert out.read_text() == "the other export"
    assert run(["chats", "export", conv_id, "--format", "md", "-o", str(out), "--force"]) == 0
    assert "An answer." in out.read_text()
