"""`gptcli chat`: a REPL on a terminal (prompt_toolkit + Rich Live Markdown), one turn per line on a pipe."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError


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


def chat(
    model: c.ModelOpt = None,
    backend: c.BackendOpt = None,
    device: c.DeviceOpt = None,
    dtype: c.DtypeOpt = None,
    precision: c.PrecisionOpt = None,
    threads: c.ThreadsOpt = None,
    temperature: c.TemperatureOpt = None,
    top_k: c.TopKOpt = None,
    top_p: c.TopPOpt = None,
    min_p: c.MinPOpt = None,
    repetition_penalty: c.RepetitionPenaltyOpt = None,
    max_tokens: c.MaxTokensOpt = None,
    seed: c.SeedOpt = None,
    stop: c.StopOpt = None,
    system: c.SystemOpt = None,
    continue_: Annotated[bool, typer.Option("--continue", help="Resume the most recent conversation.")] = False,
    resume: Annotated[str | None, typer.Option("--resume", "-r", help="Resume a saved conversation (id).")] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Raw text replies (no Markdown rendering).")] = False,
    no_reuse: Annotated[
        bool, typer.Option("--no-context-reuse", help="Prefill the whole history every turn (for comparison).")
    ] = False,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Chat with a model: multi-turn, saved as it goes, resumable.

    On a terminal: line editing and history, \"\"\" … \"\"\" or Esc-Enter for multi-line input, /help for
    commands, Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at an empty prompt) leaves. On a pipe: one user
    turn per line, replies on stdout.

    Examples:
      gptcli chat
      gptcli chat --system "You are terse." --temperature 0.3
      gptcli chat --continue
      printf 'Hi\\nWhat did I just say?\\n' | gptcli chat
    """
    from gptcli.chat import ChatSession, Conversation, ConversationStore
    from gptcli.runtime import open_runtime

    if continue_ and resume:
        raise UsageError("--continue and --resume cannot be used together")
    resolved = c.resolve_settings_from(config, locals())
    settings = resolved.settings
    store = ConversationStore()
    conversation: Conversation | None = None
    if continue_:
        conversation = store.latest()
    elif resume:
        conversation = store.load(resume)
    if conversation is None:
        conversation = Conversation(system=settings.system)
    else:
        if conversation.model and resolved.sources["model"] == "default":
            settings = replace(settings, model=conversation.model)  # resume with the model it was held with
        if resolved.sources["system"] != "default":
            conversation.system = settings.system
        # Settings changed with /set come back on resume, except those given again as flags now.
        for key in list(conversation.sampling):
            if resolved.sources.get(f"sampling.{key}") == "flag":
                del conversation.sampling[key]
    if Path(settings.model).expanduser().exists():  # a folder or file: remember where, for a later --resume
        settings = replace(settings, model=str(Path(settings.model).expanduser().resolve()))
    conversation.model = settings.model

    runtime = open_runtime(settings, c.note)
    session = ChatSession(
        runtime.backend,
        runtime.tokenizer,
        settings,
        conversation,
        store,
        warn=c.warn,
        reuse_context=not no_reuse,
    )
    if settings.system and not runtime.tokenizer.chat_template:
        c.warn("this model has no chat template: the conversation is sent as a plain transcript")
    interactive = _isatty(sys.stdin) and _isatty(sys.stdout)
    if interactive:
        Repl(session, runtime.backend.name, markdown=not plain).run()
    else:
        run_piped(session, runtime.backend.name)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):
        return False


def run_piped(session: Any, backend_name: str) -> None:
    """One user turn per line (or a \"\"\" block); replies, and only replies, on stdout."""
    from gptcli.chat import collect_message, is_command, run_command

    lines = _stdin_lines()

    def more() -> str | None:
        return next(lines, None)

    for first in lines:
        text = collect_message(first, more)
        if not text.strip():
            continue
        try:
            if is_command(text):
                result = run_command(session, text, backend_name)
                if result.output:
                    print(result.output, file=sys.stderr)
                if result.action == "exit":
                    break
                if result.action != "retry":
                    continue
                turn = session.retry()
            else:
                turn = session.say(text)
        except GptcliError as exc:
            _report(exc)
            continue
        interrupted = _stream_plain(turn)
        if interrupted:
            c.stderr_console().print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED)


def _stdin_lines():
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    for raw in buffer:
        yield c.decode_text(raw, "standard input").rstrip("\r\n")


def _stream_plain(turn: Any) -> bool:
    """Write the reply as it comes; return whether it was interrupted."""
    try:
        with ReplyInterrupts():
            _stream_plain_events(turn)
    except (KeyboardInterrupt, SecondInterrupt):
        turn.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return turn.interrupted


def _report(exc: GptcliError) -> None:
    from gptcli.cli.app import report

    report(exc)


class Repl:
    """The interactive loop: prompt_toolkit for input, Rich Live Markdown (or raw text) for replies."""

    def __init__(self, session: Any, backend_name: str, *, markdown: bool) -> None:
        self.session = session
        self.backend_name = backend_name
        self.markdown = markdown
        self.err = c.stderr_console()
        self.prompt = self._make_prompt()

    def _make_prompt(self) -> Any:
        import os

        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory
        from prompt_toolkit.key_binding import KeyBindings

        from gptcli.paths import data_dir

        history_file = data_dir() / "chat-input-history"
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history_file.touch(mode=0o600, exist_ok=True)
        os.chmod(history_file, 0o600)
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

        return PromptSession(history=FileHistory(str(history_file)), key_bindings=bindings, multiline=False)

    def read(self, continuation: bool = False) -> str:
        return self.prompt.prompt("... " if continuation else ">>> ")

    def run(self) -> None:
        from gptcli.chat import collect_message, is_command, run_command

        conv = self.session.conversation
        resumed = f" · resumed {conv.id} ({len(conv.messages)} messages)" if conv.messages else ""
        self.err.print(
            f"gptcli chat · {conv.model}{resumed} · /help for commands · Ctrl-D to leave", markup=False, style="dim"
        )

        def more() -> str | None:
            try:
                return self.read(continuation=True)
            except EOFError:
                return None
            except KeyboardInterrupt:
                raise CancelledMessage from None

        while True:
            try:
                text = collect_message(self.read(), more)
            except CancelledMessage:  # Ctrl-C inside a """ block drops the block, not the session
                continue
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                continue
            try:
                if is_command(text):
                    result = run_command(self.session, text, self.backend_name)
                    if result.output:
                        print(result.output, flush=True)
                    if result.action == "exit":
                        break
                    if result.action != "retry":
                        continue
                    turn = self.session.retry()
                else:
                    turn = self.session.say(text)
            except GptcliError as exc:
                _report(exc)
                continue
            self.show_reply(turn)
        if self.session.conversation.messages:
            conv_id = self.session.conversation.id
            self.err.print(f"saved as {conv_id} · gptcli chat --resume {conv_id}", markup=False, style="dim")

    def show_reply(self, turn: Any) -> None:
        """Stream one reply. First Ctrl-C: stop it, keep it; second Ctrl-C: save and exit 130."""
        try:
            with ReplyInterrupts():
                if self.markdown:
                    self._stream_markdown(turn)
                else:
                    _stream_plain_events(turn)
        except KeyboardInterrupt:
            turn.close()
        except SecondInterrupt:
            turn.close()
            sys.stdout.write("\n")
            self.err.print("interrupted", style="yellow")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if turn.interrupted:
            self.err.print("[interrupted: the partial reply is kept]", markup=False, style="yellow")

    def _stream_markdown(self, turn: Any) -> None:
        from rich.live import Live
        from rich.markdown import Markdown

        from gptcli.decoding import Token

        console = c.stdout_console()
        text = ""
        with Live(console=console, refresh_per_second=12, vertical_overflow="visible") as live:
            for event in turn:
                if isinstance(event, Token) and event.text:
                    text += event.text
                    live.update(Markdown(text))


def _stream_plain_events(turn: Any) -> None:
    from gptcli.decoding import Token

    out = sys.stdout
    last = ""
    for event in turn:
        if isinstance(event, Token) and event.text:
            out.write(event.text)
            out.flush()
            last = event.text
    if not last.endswith("\n"):
        out.write("\n")
        out.flush()
