"""One completion from a model loaded here: load, fit the prompt, stream to stdout (generate's local path)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from typing import Any

from gptcli.cli import render


def load_runtime(settings: Any) -> Any:
    """`runtime.open_runtime` with notes on stderr, and under `-v` what was loaded, where it runs, how long it took."""
    from gptcli.runtime import open_runtime

    started = time.perf_counter()
    with render.StageProgress(plain_lines=True) as conversion:  # a first use converts the model: tens of seconds
        runtime = open_runtime(settings, render.note, conversion)
    info = runtime.backend.info
    render.detail(
        f"loaded {runtime.model.name} ({runtime.model.path}): {info.architecture}, {info.params:,} parameters,"
        f" {info.num_layers} layers, context {info.context_length}, vocab {info.vocab_size}"
        f" · {runtime.backend_name}/{info.device}/{info.dtype} · {time.perf_counter() - started:.2f} s"
    )
    return runtime


def open_local_model(settings: Any) -> Any:
    """`runtime.open_model` with notes on stderr and a first use's conversion shown as it goes."""
    from gptcli.runtime import open_model

    with render.StageProgress(plain_lines=True) as conversion:
        return open_model(settings, render.note, conversion)


def run_generation(settings, text: str, *, raw: bool, as_json: bool, show_stats: bool) -> None:
    """Load, fit the prompt, stream events to stdout; exit 130 after flushing on Ctrl-C."""

    from gptcli.cli.remote_run import exit_if_interrupted, stream_or_exit
    from gptcli.decoding import NO_STATS, Finished
    from gptcli.engine import generate
    from gptcli.prompts import fit_prompt

    runtime = prompt = None
    try:
        runtime = load_runtime(settings)
        if settings.system and not runtime.tokenizer.chat_template:
            render.warn("this model has no chat template: --system is ignored")
        prompt = fit_prompt(
            runtime.tokenizer,
            text,
            context_length=runtime.backend.info.context_length,
            max_tokens=settings.sampling.max_tokens,
            on_overflow=settings.on_overflow,
            system=settings.system,
            raw=raw,
        )
    except KeyboardInterrupt:  # while the model loads (a first run converts it): --json still gets its object
        if not as_json:
            raise  # nothing to flush: exit 130 (the loader said what it left, if anything)
        finished = Finished("interrupted", NO_STATS, "", ())
    else:
        if prompt.warning:
            render.warn(prompt.warning)
        sampling = replace(settings.sampling, continues_prompt=prompt.continues)  # text sent as is is completed
        events = generate(runtime.backend, runtime.tokenizer, prompt.ids, sampling)
        finished = stream_or_exit(events, show=not as_json)
        if finished.reason == "context":  # as llama-cli does: say why it stopped short of --max-tokens
            context = runtime.backend.info.context_length
            render.warn(f"stopped at the model's context limit ({context} tokens, prompt included)")
    if as_json:
        info = runtime.backend.info if runtime else None
        payload = {
            **render.result_fields(finished),
            "model": runtime.model.name if runtime else None,  # None: interrupted before the model was loaded
            "backend": runtime.backend_name if runtime else None,
            "device": info.device if info else None,
            "dtype": info.dtype if info else None,
            "seed": settings.sampling.seed,
            "templated": prompt.templated if prompt else None,
        }
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    exit_if_interrupted(finished)
    fail_if_errored(finished)
    render.warn_if_incomplete(finished, settings.sampling)
    if show_stats or render.verbosity() >= render.VERBOSE:
        render.print_stats(finished, runtime.backend_name, runtime.backend.info.device, settings.sampling.seed)


def fail_if_errored(finished: Any) -> None:
    """A reply that ended in error (its structured output could not go on) is an error exit, not a quiet 0."""
    if finished.reason == "error":
        from gptcli.errors import ConfigError

        reason = finished.error or "generation failed"
        raise ConfigError(f"the reply stopped: {reason}", hint="see the README's Structured output section")
