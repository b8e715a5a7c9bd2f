"""Client mode (`--url`): generate, chat and summarize with the model on an OpenAI-compatible server.

The model runs there (gptcli serve, llama-server, ollama, vLLM); the sampling settings are sent with
every request. Token counts use the served model's tokenizer when it is here (a catalogue model in
the cache, or a folder of that name), else the server's /tokenize, else an estimate of 4 characters a token.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import typer

from gptcli.cli import render
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, UsageError

DEFAULT_CONTEXT = 4096  # for summarize, when the server does not say its model's context


def check_client_flags(url: str | None, timeout: float | None = None, **flags: Any) -> None:
    """Flags about running the model here make no sense with --url, nor --timeout without it: a usage error
    (exit 2) names them."""
    if url is not None:
        check_url(url)
    if timeout is not None and url is None:
        raise UsageError("--timeout: only used with --url (how long to wait for a server)", hint="add --url or drop it")
    if timeout is not None and not 0 < timeout < math.inf:
        raise UsageError(f"--timeout {timeout:g}: not a number of seconds above 0", hint="e.g. --timeout 1800")
    given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value not in (None, False)]
    if url is not None and given:
        raise UsageError(
            f"{', '.join(given)}: not used with --url (the model runs on the server)",
            hint=f"drop {'them' if len(given) > 1 else 'it'}, or drop --url to run the model here",
        )


def check_url(url: str) -> None:
    """An http(s) URL with a host and, if any, a numeric port; no credentials (they would show in errors)."""
    from urllib.parse import urlsplit

    example = "e.g. --url http://127.0.0.1:8080/v1"
    shown = url if url.isprintable() else repr(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise UsageError(f"--url {shown}: not a valid URL ({exc})", hint=example) from None
    if not url.isprintable() or any(c.isspace() for c in url):
        raise UsageError(f"--url {shown}: a URL has no spaces or control characters", hint=example)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {shown}: not an http:// or https:// URL with a host", hint=example)
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            "--url: credentials in the URL would show in every message", hint="give the key with --api-key"
        )


def open_remote(url: str, api_key: str | None, model: str | None, timeout: float | None = None) -> Any:
    """The server's model (`model`, or the first it lists); a refused connection fails here, before any work."""
    from gptcli.remote import RemoteModel

    remote = RemoteModel(url, api_key=api_key, model=model, timeout=timeout)
    render.note(f"using {remote.model} at {remote.base_url}")
    return remote


def served_tokenizer(remote: Any) -> Any:
    """The served model's tokenizer: here when it is (never fetched nor converted), else the server's own
    (/tokenize: gptcli serve, vLLM, llama-server), else an estimate of 4 characters a token."""
    from gptcli.models import catalogue_name
    from gptcli.paths import models_dir
    from gptcli.remote_tokens import EstimatedTokenizer, ServedTokenizer
    from gptcli.tokenizer import Tokenizer

    name = catalogue_name(remote.model)
    folder = models_dir() / name if name is not None else Path(remote.model).expanduser()
    if (folder / "tokenizer.json").is_file():
        try:
            return Tokenizer(folder)
        except Exception:  # an unreadable tokenizer: ask the server instead
            pass
    served = ServedTokenizer.probe(remote)
    if served is not None:
        return served
    render.note(f"{remote.root_url} has no /tokenize: token counts are estimated at 4 characters a token")
    return EstimatedTokenizer()


def run_remote_generation(remote: Any, settings: Any, text: str, *, raw: bool, as_json: bool, show_stats: bool) -> None:
    """`generate --url`: the prompt as a user message (or raw text), streamed as a local one is."""
    from gptcli.prompts import messages_for

    sampling = settings.sampling
    if not raw and remote.templated is False:  # as a local run of a model without one: the text is completed
        if settings.system:
            render.warn("this model has no chat template: --system is ignored")
        raw = True
    events = remote.complete(text, sampling) if raw else remote.chat(messages_for(text, settings.system), sampling)
    start = time.perf_counter()
    received: list[Any] = []

    def broken_off(exc: GptcliError) -> None:
        """The stream broke off: --json still gets its object, with the text so far (none, when it broke before
        its first token: an error event first, a connection cut after the 200)."""
        if as_json:
            from gptcli.decoding import Finished
            from gptcli.remote_answers import streamed_stats

            # The prompt's tokens are unknown (a server says them at the end); the times are the client's.
            end = received[-1].t if received else time.perf_counter()
            stats = streamed_stats(start, received[0].t if received else None, end, len(received))
            text = "".join(token.text for token in received)
            write_json(Finished("error", stats, text, (), error=exc.message), remote, sampling, raw=raw)

    try:
        first = next(events)  # the request is made here: a refusal is an error before anything is printed
    except GptcliError as exc:
        if getattr(exc, "mid_answer", False):  # not a refusal: an answer that began, then broke off
            broken_off(exc)
        raise
    try:
        finished = stream_or_exit(_kept(itertools.chain([first], events), received), show=not as_json)
    except GptcliError as exc:
        broken_off(exc)
        raise
    if as_json:
        write_json(finished, remote, sampling, raw=raw)
    exit_if_interrupted(finished)
    render.warn_if_incomplete(finished, sampling)
    if show_stats:
        print_remote_stats(finished, remote)


def _kept(events: Any, received: list[Any]) -> Any:
    """`events`, each Token also put in `received`."""
    from gptcli.decoding import Token

    for event in events:
        if isinstance(event, Token):
            received.append(event)
        yield event


def write_json(finished: Any, remote: Any, sampling: Any, *, raw: bool) -> None:
    """`generate --url --json`'s object."""
    payload = {
        **render.result_fields(finished),
        "model": remote.model,
        "url": remote.base_url,
        "seed": sampling.seed,
        "templated": not raw,
    }
    sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def stream_or_exit(events: Any, *, show: bool) -> Any:
    """Stream to stdout and return the Finished event; on Ctrl-C keep what was written and exit 130.

    Without `show` (--json) a reply the engine ended as interrupted is returned with its partial text:
    the caller prints it, then calls `exit_if_interrupted`."""
    finished = None
    try:
        finished = render.stream_text(events, show=show)
    except KeyboardInterrupt:  # between two events: what was written stays written
        if not show:
            finished = _ended_after_interrupt(events)
    if finished is None or show:
        exit_if_interrupted(finished)
    return finished


def _ended_after_interrupt(events: Any) -> Any:
    """Ctrl-C came between two events: the engine's generator (`engine.generate`) takes it thrown in and
    still ends the reply ('interrupted', with its text); None from anything that cannot."""
    import contextlib

    from gptcli.decoding import Finished

    if not hasattr(events, "throw"):
        return None
    with contextlib.suppress(KeyboardInterrupt, StopIteration):
        event = events.throw(KeyboardInterrupt())
        while not isinstance(event, Finished):
            event = next(events)
        return event
    return None


def exit_if_interrupted(finished: Any) -> None:
    if finished is None or finished.reason == "interrupted":
        render.stderr_console().print("interrupted", style="yellow")
        raise typer.Exit(EXIT_INTERRUPTED)


def print_remote_stats(finished: Any, remote: Any) -> None:
    """The `--stats` line: timings as the client saw them (network included), why it stopped, where it ran."""
    from gptcli.timings import timings_line

    line = f"{timings_line(finished.stats)} · finish {finished.reason} · {remote.model} at {remote.base_url}"
    render.stderr_console().print(render.inert(line), markup=False, style="dim")


def remote_chat_session(remote: Any, settings: Any, conversation: Any, store: Any) -> Any:
    """`chat --url`: the conversation (saved as a local one) with its replies from the server."""
    from gptcli.chat.remote_session import RemoteChatSession

    conversation.model = remote.model
    return RemoteChatSession(
        remote,
        served_tokenizer(remote),
        settings,
        conversation,
        store,
        warn=render.warn,
        context_length=remote.context_length,
    )


def remote_summarizer(remote: Any, template: Any, sampling: Any, *, parallel: int | None, **options: Any) -> Any:
    """`summarize --url`: the one pipeline, each stage's calls sent `parallel` (8) at a time for the server to batch."""
    from gptcli.summarize import DEFAULT_PARALLEL, Summarizer, plain_summary_prompt

    context = remote.context_length
    if context is None:
        render.note(f"the server does not say its model's context: assuming {DEFAULT_CONTEXT} tokens")
    threads = parallel or DEFAULT_PARALLEL
    as_text = plain_summary_prompt if remote.templated is False else None  # as a local run of such a model

    def calls(requests: list, params: Any) -> Any:
        return remote.chat_many(requests, params, threads, as_text)

    tokenizer = served_tokenizer(remote)
    return Summarizer(
        None,
        tokenizer,
        template,
        sampling,
        parallel=parallel,
        calls=calls,
        context_length=context or DEFAULT_CONTEXT,
        **options,
    )
