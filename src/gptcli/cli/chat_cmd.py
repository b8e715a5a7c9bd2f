"""`gptcli chat`: a REPL on a terminal (see `cli.chat_repl`), one turn per line on a pipe."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.chat_pipe import run_piped
from gptcli.cli.chat_repl import ReplyInterrupts, SecondInterrupt
from gptcli.cli.inputs import isatty
from gptcli.cli.settings import constrain, output_constraint, resolve_settings
from gptcli.errors import ConfigError, ModelError, UsageError

__all__ = ["ReplyInterrupts", "SecondInterrupt", "chat", "run_piped"]


def chat(
    model: c.ModelOpt = None,
    url: c.UrlOpt = None,
    api_key: c.ApiKeyOpt = None,
    timeout: c.TimeoutOpt = None,
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
    frequency_penalty: c.FrequencyPenaltyOpt = None,
    presence_penalty: c.PresencePenaltyOpt = None,
    repetition_stop: c.RepetitionStopOpt = None,
    max_tokens: c.MaxTokensOpt = None,
    seed: c.SeedOpt = None,
    stop: c.StopOpt = None,
    system: c.SystemOpt = None,
    chat_template: c.ChatTemplateOpt = None,
    json_schema: c.JsonSchemaOpt = None,
    output_format: c.FormatOpt = None,
    regex: c.RegexOpt = None,
    grammar: c.GrammarOpt = None,
    continue_: Annotated[bool, typer.Option("--continue", help="Resume the most recent conversation.")] = False,
    resume: Annotated[
        str | None,
        typer.Option("--resume", "-r", help="Resume a saved conversation (id).", parser=c.nonempty_id, metavar="<id>"),
    ] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Raw text replies (no Markdown rendering).")] = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Pipe mode with one JSON object per reply on stdout (even on a terminal).")
    ] = False,
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
      printf 'Hi\\n' | gptcli chat --jsonl    # {"role": "assistant", ...}
      gptcli chat --url http://127.0.0.1:8080/v1    # the model on that server
    """
    from gptcli.chat import ChatSession, ConversationStore
    from gptcli.chat.commands import format_flag
    from gptcli.chat.opening import open_conversation
    from gptcli.cli.local_run import load_runtime
    from gptcli.cli.remote_run import check_client_flags

    check_client_flags(
        url,
        timeout,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
    )
    if continue_ and resume is not None:
        raise UsageError("--continue and --resume cannot be used together")
    structured = output_constraint(json_schema, output_format, regex, url, grammar)
    resolved = resolve_settings(
        config,
        model=model,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        repetition_stop=repetition_stop,
        max_tokens=max_tokens,
        seed=seed,
        stop=stop,
        system=system,
        chat_template=chat_template,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    store = ConversationStore()
    given = structured is not None or output_format == "text"  # a resumed chat keeps its own otherwise
    settings, conversation = open_conversation(
        resolved, store, latest=continue_, ref=resume, output=structured, output_given=given, remote=url is not None
    )
    for reason in store.skipped:  # --continue went past a file it could not read: it may have been the newest
        render.warn(f"skipped {reason}")
    settings = constrain(settings, conversation.output)  # every reply, until /format changes it
    if url is not None:
        from gptcli.cli.remote_run import open_remote, remote_chat_session

        remote = open_remote(url, api_key, model, timeout)
        session, where = remote_chat_session(remote, settings, conversation, store), "remote"
    else:
        try:
            runtime = load_runtime(settings)
        except ModelError as exc:  # a resumed chat's model, moved or deleted since: said as such, not a bare path
            if resolved.sources["model"] != "default" or settings.model == resolved.settings.model:
                raise
            hint = f"{exc.hint}, or continue it with another model: --model NAME" if exc.hint else "pass --model NAME"
            raise ModelError(f"conversation {conversation.id}'s model: {exc.message}", hint=hint) from None
        except ConfigError as exc:  # a resumed chat's chat template file, moved or deleted since
            if resolved.sources["chat_template"] != "default" or not settings.chat_template:
                raise
            hint = "restore it, pass --chat-template FILE, or --model NAME to render with the model's own"
            raise ConfigError(f"conversation {conversation.id}'s {exc.message}", hint=hint) from None
        session = ChatSession(
            runtime.backend,
            runtime.tokenizer,
            settings,
            conversation,
            store,
            warn=render.warn,
            reuse_context=not no_reuse,
        )
        if settings.system and not runtime.tokenizer.chat_template:
            render.warn("this model has no chat template: the conversation is sent as a plain transcript")
        where = runtime.backend_name
    session.output_source = format_flag(structured) if given else ""  # else its file's, for /show
    if isatty(sys.stdin) and isatty(sys.stdout) and not jsonl:
        from gptcli.cli.chat_repl import Repl

        Repl(session, where, markdown=not plain).run()
    else:
        run_piped(session, where, jsonl=jsonl)
    if session.save_error is not None:  # warned when it happened; the replies were given all the same
        raise session.save_error
