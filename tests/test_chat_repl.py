"""The chat REPL driven through a real pseudo-terminal: typing, commands, multi-line, Ctrl-C, Ctrl-D, resume."""

import json
import os
import sys

import pytest

from tests.conftest import REPO, fill_up

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>>"  # prompt_toolkit draws the trailing space as a cursor move
BACKENDS = "scripted=tests.scripted:ScriptedBackend,stubborn=tests.stubborn_backend:StubbornBackend"


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def say(tok, text):
    return [*tok.encode(text, add_special_tokens=False), min(tok.eos_ids)]


def spawn(tiny_models, script, *args, delay="0", backend="scripted", cursor_reports=False):
    env = {
        **os.environ,
        "GPTCLI_BACKEND_PATHS": BACKENDS,
        "GPTCLI_TEST_SCRIPT": json.dumps(script),
        "GPTCLI_TEST_CONTEXT": "100000",
        "GPTCLI_TEST_DELAY": delay,
        "TERM": "xterm",
        **({} if cursor_reports else {"PROMPT_TOOLKIT_NO_CPR": "1"}),
    }
    cmd = [sys.executable, "-m", "gptcli", "chat", "-m", str(tiny_models["llama"]), "-b", backend, *args]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, cwd=str(REPO), timeout=30, dimensions=(40, 120), encoding="utf-8")
    child.expect_exact(PROMPT)
    return child


def saved_conversations(home):
    folder = home / "data" / "chats"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def leave(child) -> None:
    """/exit: the REPL ends at once with exit 0."""
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_repl_typing_commands_multiline_ctrl_c_ctrl_d_and_resume(tiny_models, tok, isolated_home):
    script = say(tok, "Hello there.") + say(tok, "Multi ok.") + say(tok, "Esc ok.") + say(tok, "word " * 400)
    child = spawn(tiny_models, script, "--plain", delay="0.02")

    child.sendline("Hi")
    child.expect_exact("Hello there.")
    child.expect_exact(PROMPT)

    child.sendline("/help")
    child.expect_exact("/retry")
    child.expect_exact(PROMPT)
    child.sendline("/nope")
    child.expect_exact("error: unknown command /nope")
    child.expect_exact(PROMPT)

    child.sendline('"""first line')
    child.expect_exact("...")
    child.sendline('second line"""')
    child.expect_exact("Multi ok.")
    child.expect_exact(PROMPT)

    child.send("esc one\x1b\r")  # Esc-Enter: a newline in the message, not a send
    child.send("esc two\r")
    child.expect_exact("Esc ok.")
    child.expect_exact(PROMPT)

    # Ctrl-C mid-reply stops the reply, keeps it, and the session goes on.
    child.sendline("Count")
    child.expect_exact("word word word")
    child.sendcontrol("c")
    child.expect_exact("[interrupted: the partial reply is kept]")
    child.expect_exact(PROMPT)
    assert child.isalive()

    child.sendline("/show")
    child.expect("conversation +\\S+ \\(8 messages\\)")
    child.expect_exact(PROMPT)

    # Ctrl-C with text typed clears the line and the session goes on: the next command runs alone.
    child.send("half typed")
    child.expect_exact("half typed")
    child.sendcontrol("c")
    child.sendline("/show")
    child.expect("conversation +\\S+ \\(8 messages\\)", timeout=10)
    child.expect_exact(PROMPT)
    assert child.isalive()
    # At an empty prompt, Ctrl-D leaves (exit 0).
    child.sendcontrol("d")
    child.expect_exact("saved as ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    [conv] = saved_conversations(isolated_home)
    contents = [m["content"] for m in conv["messages"]]
    assert contents[:6] == ["Hi", "Hello there.", "first line\nsecond line", "Multi ok.", "esc one\nesc two", "Esc ok."]
    assert contents[6] == "Count"
    partial = conv["messages"][7]
    assert partial["interrupted"] is True and partial["content"].startswith("word word word")
    assert len(partial["content"]) < len("word " * 400)
    assert "half typed" not in contents

    # The input history persists (mode 0600), and --continue resumes the same conversation.
    history = isolated_home / "data" / "chat-input-history"
    assert "esc one" in history.read_text() and oct(history.stat().st_mode & 0o777) == "0o600"
    child = spawn(tiny_models, say(tok, "Resumed."), "--continue", "--plain")
    assert "resumed " + conv["id"] in child.before
    child.sendline("Back again")
    child.expect_exact("Resumed.")
    child.expect_exact(PROMPT)
    child.sendcontrol("c")  # Ctrl-C at an empty prompt leaves too
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    [conv2] = saved_conversations(isolated_home)
    assert conv2["id"] == conv["id"] and conv2["messages"][-1]["content"] == "Resumed."


def test_a_markdown_reply_wider_than_the_terminal_wraps_instead_of_being_cut(tiny_models, tok, isolated_home):
    """Live cropped every line at the terminal's width (the console left wrapping to the terminal): a
    paragraph showed as its first 60 characters, the rest only in the saved chat."""
    words = [f"w{i:02d}" for i in range(40)]  # 159 characters in one paragraph, in a 60-column terminal
    child = spawn(tiny_models, say(tok, " ".join(words)))
    child.setwinsize(40, 60)
    child.sendline("Hi")
    child.expect_exact(words[-1])  # cut at the edge, the paragraph's end never reached the screen
    shown = child.before + child.after
    assert all(word in shown for word in words), shown[-400:]
    child.expect_exact(PROMPT)
    leave(child)


def test_repl_renders_markdown_and_retry(tiny_models, tok, isolated_home):
    child = spawn(tiny_models, say(tok, "Some **bold** text.") + say(tok, "Other text."))
    child.sendline("Hi")
    child.expect(r"Some (\x1b\[1m)?bold(\x1b\[0m)? text\.")  # Markdown rendered: bold, no asterisks
    assert "**" not in child.before + child.after
    child.expect_exact(PROMPT)
    child.sendline("/retry")
    child.expect_exact("Other text.")
    child.expect_exact(PROMPT)
    child.sendline('"""a draft')  # Ctrl-C inside a multi-line block drops the block, not the session
    child.expect_exact("...")
    child.sendcontrol("c")
    child.expect_exact(PROMPT)
    leave(child)
    [conv] = saved_conversations(isolated_home)
    assert [m["content"] for m in conv["messages"]] == ["Hi", "Other text."]


def test_second_ctrl_c_during_a_reply_exits_130(tiny_models, tok, isolated_home):
    """The first Ctrl-C lands in a backend call that swallows it; the second leaves (130), saving the reply."""
    from gptcli.cli.chat_cmd import ReplyInterrupts, SecondInterrupt
    from tests.stubborn_backend import SWALLOWED, WAITING

    interrupts = ReplyInterrupts()
    with pytest.raises(KeyboardInterrupt):
        interrupts.handler(2, None)
    with pytest.raises(SecondInterrupt):
        interrupts.handler(2, None)

    child = spawn(tiny_models, say(tok, "word " * 400), "--plain", delay="0.05", backend="stubborn")
    child.sendline("Count")
    child.expect_exact(WAITING)
    child.sendcontrol("c")
    child.expect_exact(SWALLOWED)  # the reply goes on: the first Ctrl-C was spent
    child.expect_exact("word")
    child.sendcontrol("c")
    child.expect_exact("interrupted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    [conv] = saved_conversations(isolated_home)
    assert f"saved as {conv['id']} · gptcli chat --resume {conv['id']}" in child.before  # as on any other way out
    assert conv["messages"][-1]["interrupted"] is True
    assert conv["messages"][-1]["content"].startswith("word word")


def test_repl_in_a_read_only_home_keeps_going_and_names_the_path_on_leaving(tiny_models, tok, isolated_home):
    from tests.test_hardening import _without_file_permission_bypass

    data = isolated_home / "data"
    data.mkdir(parents=True)
    data.chmod(0o500)
    env = {
        **os.environ,
        "GPTCLI_BACKEND_PATHS": BACKENDS,
        "GPTCLI_TEST_SCRIPT": json.dumps(say(tok, "Unsaved but here.")),
        "GPTCLI_TEST_CONTEXT": "100000",
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    cmd = [*_without_file_permission_bypass(), sys.executable, "-m", "gptcli", "chat", "--plain"]
    cmd += ["-m", str(tiny_models["llama"]), "-b", "scripted"]
    try:
        child = pexpect.spawn(
            cmd[0], cmd[1:], env=env, cwd=str(REPO), timeout=30, dimensions=(40, 200), encoding="utf-8"
        )
        child.expect_exact(f"warning: cannot write {data}/chat-input-history: Permission denied")
        child.expect_exact(PROMPT)
        child.sendline("Hi")
        child.expect_exact(f"warning: cannot write {data}/chats: Permission denied: the chat goes on unsaved")
        child.expect_exact("Unsaved but here.")
        child.expect_exact(PROMPT)
        child.sendcontrol("d")
        child.expect_exact(f"error: cannot write {data}/chats: Permission denied")
        child.expect(pexpect.EOF)
        child.close()
    finally:
        data.chmod(0o700)
    assert "saved as" not in child.before and "Traceback" not in child.before
    assert child.exitstatus == 1


def test_sigterm_at_the_prompt_keeps_the_chat_and_exits_143(tiny_models, tok, isolated_home):
    import signal

    child = spawn(tiny_models, say(tok, "Kept."), "--plain")
    child.sendline("Hello")
    child.expect_exact("Kept.")
    child.expect_exact(PROMPT)
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143
    [conv] = saved_conversations(isolated_home)
    assert [m["content"] for m in conv["messages"]] == ["Hello", "Kept."]


def test_sigterm_at_the_prompt_ends_it_even_where_a_raised_exception_would_be_swallowed():
    """CI: a chat killed at its prompt printed a Terminated traceback and went on waiting. gptcli's handler raises
    wherever the main thread is, inside prompt_toolkit and asyncio there, and some spots (a __del__, a callback
    whose errors are printed) swallow what is raised. At the prompt the handler now asks the app to exit."""
    import asyncio
    import signal

    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from gptcli.cli.chat_repl import prompt_ending_on_sigterm
    from gptcli.errors import Terminated

    def raise_terminated(signum, frame):  # as gptcli.cli.app installs it
        raise Terminated()

    swallowed = []
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with create_pipe_input() as pipe:
            session = PromptSession(input=pipe, output=DummyOutput())

            def deliver_where_errors_are_swallowed():
                try:
                    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
                except BaseException as exc:
                    swallowed.append(exc)
                    pipe.send_text("typed on\r")  # the prompt went on: end it so that the test can fail

            session.app.pre_run_callables.append(
                lambda: asyncio.get_running_loop().call_later(0.05, deliver_where_errors_are_swallowed)
            )
            with pytest.raises(Terminated):
                prompt_ending_on_sigterm(session, ">>> ")
        assert swallowed == [] and Terminated.seen
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
        Terminated.seen = False


def test_sigterm_as_the_line_is_accepted_returns_the_line_and_says_it_came():
    """QA: `kill` in the second after Enter (prompt_toolkit still closing: it waits up to a second for a terminal's
    cursor report) lost the message just typed: the prompt raised instead of returning it."""
    import asyncio
    import signal

    from prompt_toolkit import PromptSession
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from gptcli.cli.chat_repl import prompt_ending_on_sigterm
    from gptcli.errors import Terminated

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with create_pipe_input() as pipe:
            session = PromptSession(input=pipe, output=DummyOutput())

            def accept_then_kill():
                session.app.exit(result="the line typed")  # accepted: the app is still running its close
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

            session.app.pre_run_callables.append(lambda: asyncio.get_running_loop().call_later(0.05, accept_then_kill))
            try:
                line = prompt_ending_on_sigterm(session, ">>> ")
            except Terminated:  # (a KeyboardInterrupt let out would end pytest itself)
                pytest.fail("the line accepted before the kill was lost")
            assert line == "the line typed" and Terminated.seen
            with pytest.raises(Terminated):  # no further line is read (a block's next): the caller leaves
                prompt_ending_on_sigterm(session, "... ")
    finally:
        signal.signal(signal.SIGTERM, previous)
        Terminated.seen = False


def test_sigterm_right_after_enter_keeps_the_message_and_exits_143(tiny_models, tok, isolated_home):
    """With cursor reports asked for (a real terminal's default), prompt_toolkit closes after Enter by waiting for
    one; pexpect never answers, so the kill lands there. The message was lost (no chat file at all)."""
    import signal

    child = spawn(tiny_models, say(tok, "Never read."), "--plain", delay="0.05", cursor_reports=True)
    child.sendline("Keep me")
    child.expect_exact("Keep me")
    child.expect_exact("\n")
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143
    [conv] = saved_conversations(isolated_home)
    assert conv["messages"][0]["content"] == "Keep me"


def test_sigterm_during_a_reply_or_a_block_keeps_the_chat_and_exits_143(tiny_models, tok, isolated_home):
    import signal

    child = spawn(tiny_models, say(tok, "word " * 400), "--plain", delay="0.05")
    child.sendline("Count")
    child.expect_exact("word word")
    child.kill(signal.SIGTERM)  # was: the reply stopped and the chat went on, at the prompt
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143
    [conv] = saved_conversations(isolated_home)
    assert conv["messages"][-1]["interrupted"] is True and conv["messages"][-1]["content"].startswith("word word")

    child = spawn(tiny_models, say(tok, "Kept."), "--plain", "--continue")
    child.sendline('"""first line')
    child.expect_exact("...")
    child.kill(signal.SIGTERM)  # was: the block dropped and the chat went on
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143


def test_repl_shows_structured_output_as_written_not_as_markdown(tiny_models, tok, isolated_home):
    """`--regex`/`--json-schema` replies were rendered as Markdown: `{"a": "**b**"}` showed a bold b, no asterisks."""
    child = spawn(tiny_models, say(tok, "Some **bold** text."), "--regex", r"[A-Za-z *.]+")
    child.sendline("Hi")
    child.expect_exact("Some **bold** text.")
    child.expect_exact(PROMPT)
    leave(child)


def test_repl_on_a_full_disk_keeps_going_without_prompt_toolkit_s_traceback(tiny_models, tok, small_disk, monkeypatch):
    """The input history's write failed inside prompt_toolkit, which printed its traceback and 'Press ENTER to
    continue...' at every line typed; it is one warning now, and the chat goes on as on a read-only home."""
    home = small_disk("64k")
    data = home / "data"
    data.mkdir()
    (data / "chat-input-history").touch()  # there already: only a write can fail
    fill_up(home)
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    child = spawn(tiny_models, say(tok, "Still here.") + say(tok, "And here."), "--plain")
    child.sendline("Hi")
    child.expect_exact(f"warning: cannot write {data}/chat-input-history: No space left on device: the input history")
    child.expect_exact("Still here.")
    child.expect_exact(PROMPT)
    child.sendline("Again")
    child.expect_exact("And here.")
    assert "chat-input-history" not in child.before  # said once
    child.expect_exact(PROMPT)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in child.before and "Press ENTER" not in child.before
    assert child.exitstatus == 1  # the chat file could not be written either: said on leaving


def test_a_closed_terminal_keeps_the_chat_as_sigterm_does(tiny_models, tok, isolated_home):
    """QA: SIGHUP (the terminal closed, an ssh session dropped) killed the chat as kill -9 does: the ~190 tokens
    of the reply it cut were lost, with no word. It now stops as SIGTERM does, at a reply or at the prompt."""
    import signal

    child = spawn(tiny_models, say(tok, "word " * 400) + say(tok, "Kept."), "--plain", delay="0.05")
    child.sendline("Count")
    child.expect_exact("word word")
    child.ptyproc.fileobj.close()  # the terminal itself goes (its window closed): the kernel hangs up, writes fail
    _, status = os.waitpid(child.pid, 0)
    pty = child.ptyproc  # closed and reaped here: pexpect must not close the fd (another's by then) nor wait again
    pty.closed = pty.terminated = child.closed = child.terminated = True
    pty.fd = child.child_fd = -1
    # 1 before: a write to the gone terminal (EIO) before the SIGHUP handler could send output to /dev/null, since
    # isatty is false for a terminal that hung up
    assert os.waitstatus_to_exitcode(status) == 143
    [conv] = saved_conversations(isolated_home)
    assert conv["messages"][-1]["interrupted"] is True and conv["messages"][-1]["content"].startswith("word word")

    child = spawn(tiny_models, say(tok, "Kept."), "--plain", "--continue")
    child.kill(signal.SIGHUP)  # at the prompt, inside prompt_toolkit's loop
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 143, child.signalstatus
