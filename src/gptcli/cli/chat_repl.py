"""The interactive side of `gptcli chat`: prompt_toolkit for input, Ctrl-C handling, streamed replies."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, NoReturn

import typer

from gptcli.cli import render
from gptcli.errors import EXIT_INTERRUPTED, TERMINATING_SIGNALS, GptcliError, Terminated, after_hangup


class SecondInterrupt(BaseException):
    """A second Ctrl-C during the same reply: leave the program (exit 130) after saving."""


class CancelledMessage(Exception):
    """Ctrl-C at a continuation prompt: forget the message being typed."""


class ReplyInterrupts:
    """SIGINT handling while a reply streams: the first stops the reply, the second exits."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def handler(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count >= 2:
            raise SecondInterrupt
        raise KeyboardInterrupt

    def __enter__(self) -> ReplyInterrupts:
        self.count = 0
        self._previous = signal.signal(signal.SIGINT, self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def prompt_ending_on_sigterm(session: Any, message: str) -> str:
    """`session.prompt(message)`, where SIGTERM or SIGHUP ends the prompt with Terminated through prompt_toolkit's loop.

    gptcli's handler raises Terminated wherever the main thread is. At the prompt that is inside prompt_toolkit and
    asyncio, where it could land in a spot that prints an exception and goes on (CI saw a killed chat print the
    traceback and wait at the prompt). Here the handler only asks the running app to exit (as prompt_toolkit does
    with SIGINT); a SIGTERM before the app runs ends it as it starts. One after the line was accepted (prompt_toolkit
    may still be closing: it waits up to a second for a terminal's cursor report) returns the line, with
    Terminated.seen set: the caller keeps what was typed, then leaves."""
    if Terminated.seen:  # a kill came with an earlier line (a block's first): no more lines
        raise Terminated()
    app = session.app
    arrived = False

    def end_app() -> None:
        if arrived and app.is_running and app.future is not None and not app.future.done():
            app.exit(exception=Terminated)

    def on_sigterm(signum: int, frame: Any) -> None:
        nonlocal arrived
        after_hangup(signum)  # (prompt_toolkit's last writes to a gone terminal would fail)
        arrived = Terminated.seen = True
        loop = app.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: raised once the prompt returns
                loop.call_soon_threadsafe(end_app)

    previous = {sig: signal.signal(sig, on_sigterm) for sig in TERMINATING_SIGNALS}
    try:
        return session.prompt(message, pre_run=end_app)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stream_plain(turn: Any) -> bool:
    """Write the reply as it comes (any Ctrl-C stops it, keeping the partial reply); return whether it was cut."""
    try:
        with ReplyInterrupts():
            render.stream_text(turn)
    except (KeyboardInterrupt, SecondInterrupt):
        turn.close()
    except OSError:  # stdout failed (a full disk, a closed pipe): the chat file keeps the reply as far as it got
        turn.close()
        raise
    return turn.interrupted


def report_end(turn: Any, sampling: Any) -> None:
    """A reply its output grammar could not finish (`error`) or one cut short of a whole match: said on stderr."""
    finished = turn.finished
    if finished is None:
        return
    if finished.reason == "error":  # the chat goes on; `generate` exits 3 on it
        render.report(GptcliError(f"the reply stopped: {finished.error or 'generation failed'}"))
    else:
        render.warn_if_incomplete(finished, sampling)


class Repl:
    """The interactive loop: prompt_toolkit for input, Rich Live Markdown (or raw text) for replies."""

    def __init__(self, session: Any, backend_name: str, *, markdown: bool) -> None:
        self.session = session
        self.backend_name = backend_name
        self.markdown = markdown
        self.err = render.stderr_console()
        self.history_failure: str | None = None  # the input history's file could not be written: why
        self.history_unsaid = False
        self.prompt = self._make_prompt()

    @property
    def rich(self) -> bool:
        """Replies render as Markdown: unless --plain, or they follow an output format (JSON, a regex: as written)."""
        return self.markdown and self.session.settings.sampling.constraint is None

    def _make_prompt(self) -> Any:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        from gptcli.paths import data_dir

        history_file = data_dir() / "chat-input-history"
        repl = self

        class KeptHistory(FileHistory):
            """A failed write (a full disk) stops the file, not the chat: prompt_toolkit showed its traceback and
            'Press ENTER to continue...' at every line typed. The history is kept in memory from then on."""

            def store_string(self, string: str) -> None:
                if repl.history_failure is not None:
                    return
                try:
                    super().store_string(string)
                except OSError as exc:  # said once the prompt has returned (read), not over the prompt being drawn
                    repl.history_failure = f"cannot write {history_file}: {exc.strerror or exc}"
                    repl.history_unsaid = True

        history: Any
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history_file.touch(mode=0o600, exist_ok=True)
            os.chmod(history_file, 0o600)
            history = KeptHistory(str(history_file))
        except OSError as exc:  # a read-only home: keep the input history for this session only
            from prompt_toolkit.history import InMemoryHistory

            render.warn(f"cannot write {history_file}: {exc.strerror or exc}: the input history is not kept")
            history = InMemoryHistory()
        bindings = KeyBindings()

        @bindings.add("escape", "enter")
        def _newline(event: Any) -> None:
            event.current_buffer.insert_text("\n")

        @bindings.add("c-c")
        def _interrupt(event: Any) -> None:
            buffer = event.current_buffer
            if buffer.text:
                buffer.reset()  # Ctrl-C on a half-typed line clears it
            else:
                event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

        return PromptSession(history=history, key_bindings=bindings, multiline=False)

    def read(self, continuation: bool = False) -> str:
        try:
            return prompt_ending_on_sigterm(self.prompt, "... " if continuation else ">>> ")
        finally:
            if self.history_unsaid:
                self.history_unsaid = False
                render.warn(f"{self.history_failure}: the input history is not kept from here on")

    def _more(self) -> str | None:
        try:
            return self.read(continuation=True)
        except EOFError:
            return None
        except Terminated:
            raise  # `kill` leaves, as at the first prompt; only Ctrl-C drops the block and stays
        except KeyboardInterrupt:
            raise CancelledMessage from None

    def run(self) -> None:
        from gptcli.chat import collect_message, dispatch

        conv = self.session.conversation
        resumed = f" · resumed {conv.id} ({len(conv.messages)} messages)" if conv.messages else ""
        banner = f"gptcli chat · {conv.model}{resumed} · /help for commands · Ctrl-D to leave"
        self.err.print(render.inert(banner), markup=False, style="dim")
        while True:
            try:
                text = collect_message(self.read(), self._more)
            except CancelledMessage:  # Ctrl-C inside a """ block drops the block, not the session
                continue
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                if Terminated.seen:
                    break
                continue
            try:
                step = dispatch(self.session, text, self.backend_name)
            except GptcliError as exc:
                render.report(exc)
                continue
            if Terminated.seen:  # killed as the line was read: the message is saved as sent; no reply is started
                if step.turn is not None:
                    step.turn.close()
                break
            if step.output:
                print(render.inert(step.output), flush=True)
            if step.exit:
                break
            if step.turn is not None:
                try:
                    self.show_reply(step.turn)
                except GptcliError as exc:  # the reply broke off (a server's stream): kept as far as it came
                    render.report(exc)
        self._say_saved()

    def _say_saved(self) -> None:
        """On leaving: the id to resume the conversation by (when it was saved)."""
        if self.session.conversation.messages and self.session.save_error is None:
            conv_id = self.session.conversation.id
            self.err.print(f"saved as {conv_id} · gptcli chat --resume {conv_id}", markup=False, style="dim")

    def show_reply(self, turn: Any) -> None:
        """Stream one reply. First Ctrl-C: stop it, keep it; second Ctrl-C: save and exit 130."""
        try:
            with ReplyInterrupts():
                if self.rich:
                    render.stream_markdown(turn)
                else:
                    render.stream_text(turn)
        except KeyboardInterrupt:
            turn.close()
        except SecondInterrupt:
            turn.close()
            self._leave()
        if Terminated.seen:  # `kill` (wherever the turn caught it): the partial reply is kept; leave (143), not stay
            self._leave()
        if turn.interrupted:
            self.err.print("[interrupted: the partial reply is kept]", markup=False, style="yellow")
        report_end(turn, self.session.settings.sampling)
        from gptcli.chat import stats_text

        render.detail(stats_text(self.session))  # -v: the reply's timings

    def _leave(self) -> NoReturn:
        """After a reply cut by a second Ctrl-C or by SIGTERM: end its line, say so, exit (run() makes
        SIGTERM's 143 of it)."""
        if self.rich:  # the plain stream has ended its line already
            sys.stdout.write("\n")
        self.err.print("interrupted", style="yellow")
        self._say_saved()
        raise typer.Exit(EXIT_INTERRUPTED) from None
