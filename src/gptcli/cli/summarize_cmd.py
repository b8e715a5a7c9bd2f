"""`gptcli summarize`: a summary of a file or stdin, of any length (map-reduce when it outgrows the context)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.inputs import is_stdin, read_stdin_if_piped
from gptcli.cli.settings import resolve_settings
from gptcli.errors import EXIT_INTERRUPTED, GptcliError, InputError
from gptcli.textio import DOCUMENT, read_text_file


def summarize(
    file: Annotated[Path | None, c.path_argument("The text file (default, or -: stdin).")] = None,
    length: Annotated[str | None, typer.Option("--length", "-l", help="short | medium (default) | long")] = None,
    fmt: Annotated[str, typer.Option("--format", help="paragraph | bullets")] = "paragraph",
    strategy: Annotated[str, typer.Option("--strategy", help="auto | stuff | map-reduce")] = "auto",
    chunk_tokens: Annotated[
        int | None, typer.Option("--chunk-tokens", help="Most tokens per chunk (default: what the context allows).")
    ] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", help="Tokens repeated from the previous chunk.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: summary, chunks, token counts, timings.")
    ] = False,
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
    parallel: c.ParallelOpt = None,
    kv_budget: c.KvBudgetOpt = None,
    chat_template: c.ChatTemplateOpt = None,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Summarise a document of any length; only the summary goes to stdout.

    Examples:
      cat report.txt | gptcli summarize
      gptcli summarize paper.txt --length short --format bullets
      gptcli summarize big.txt --strategy map-reduce --chunk-tokens 1500
      gptcli summarize notes.md --json
      gptcli summarize book.txt --parallel 4 --kv-budget 1GiB
      gptcli summarize doc.txt --url http://127.0.0.1:8080/v1    # on that server
    """
    from gptcli.cli.remote_run import check_client_flags, open_remote
    from gptcli.summarize import SummaryInterrupted, SummaryResult
    from gptcli.summary_options import FORMATS, LENGTHS, SummaryOptions
    from gptcli.templates import apply_sampling_defaults, get_template

    check_client_flags(
        url,
        timeout,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        kv_budget=kv_budget,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
    )
    options = SummaryOptions("medium" if length is None else length, fmt, strategy, chunk_tokens, overlap)
    options.check()
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
        chat_template=chat_template,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    template = get_template("summarize")
    variables = {"length": LENGTHS[options.length][0], "format": FORMATS[fmt]}
    template.check_filled_by("gptcli summarize", variables)  # before the model loads
    settings = apply_sampling_defaults(resolved, template)
    # max_tokens you set (flag, env, config) > an explicit --length > the template's > --length's default
    if resolved.sources["sampling.max_tokens"] == "default" and (
        length is not None or "max_tokens" not in template.sampling
    ):
        settings = replace(settings, sampling=replace(settings.sampling, max_tokens=LENGTHS[options.length][1]))
    text, error = _read_input(file), None
    where = {"model": model, "url": url} if url is not None else dict.fromkeys(("model", "backend", "device"))
    with render.StageProgress() as progress:
        try:
            remote = open_remote(url, api_key, model, timeout) if url is not None else None
            summarizer, where = _summarizer(
                remote,
                settings,
                template,
                progress=lambda update: progress(update.stage, update.done, update.total, _detail(update)),
                variables=variables,
                parallel=parallel,
                kv_budget=kv_budget,
            )
            result = summarizer.run(text, options)
        except SummaryInterrupted as stop:
            result, error = stop.result, stop.error
        except KeyboardInterrupt:  # while the model loads: --json still gets its partial object
            result = SummaryResult("", "", 0, 0, 0, parallel=parallel, interrupted=True)  # (None: not chosen yet)
    if result.interrupted:  # --json: the whole object's keys, model and backend null while it loaded
        _stop_with_partial({**result.as_dict(), **where}, result, as_json, error)
    if result.strategy == "map-reduce":
        levels = f"{result.combine_levels} combine level(s)"
        render.note(f"map-reduce: {len(result.chunks)} chunks of at most {result.chunk_budget} tokens, {levels}")
    if as_json:
        print(json.dumps({**result.as_dict(), **where}, ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(result.summary.rstrip("\n") + "\n")
        sys.stdout.flush()


def _summarizer(remote, settings, template, *, kv_budget, **options):
    """The Summarizer over the model loaded here, or over a server's (--url); and where it runs, for --json."""
    if remote is not None:
        from gptcli.cli.remote_run import remote_summarizer

        where = {"model": remote.model, "url": remote.base_url}
        return remote_summarizer(remote, template, settings.sampling, **options), where
    from gptcli.cli.local_run import load_runtime
    from gptcli.engine import parse_kv_budget
    from gptcli.summarize import Summarizer

    parse_kv_budget(kv_budget, 1)  # its syntax, before the model loads (a size needs the model's numbers)
    runtime = load_runtime(settings)
    budget = parse_kv_budget(kv_budget, runtime.backend.info.kv_bytes_per_token)
    summarizer = Summarizer(
        runtime.backend, runtime.tokenizer, template, settings.sampling, kv_budget_tokens=budget, **options
    )
    where = {"model": runtime.model.name, "backend": runtime.backend_name, "device": runtime.backend.info.device}
    return summarizer, where


def _detail(update) -> str:
    """`1,024 tokens, 61.2 tok/s, ETA 0:12` for the progress bar."""
    eta = f", ETA {int(update.eta_s) // 60}:{int(update.eta_s) % 60:02d}" if update.eta_s is not None else ""
    return f"{update.tokens:,} tokens, {update.tokens_per_s:.1f} tok/s{eta}" if update.tokens else ""


def _stop_with_partial(data: dict, result, as_json: bool, error: GptcliError | None) -> NoReturn:
    """Ctrl-C or an error mid-run: finished chunk summaries to stdout (JSON: `data`); exit 130 or the error"""
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2))
    elif result.partials:
        sys.stdout.write("\n\n".join(p.rstrip("\n") for p in result.partials) + "\n")
        sys.stdout.flush()
    done = len(result.partials)
    said = f"{done} of {len(result.chunks)} chunk summaries were finished" if result.chunks else "no summary yet"
    why = "interrupted" if error is None else "stopped by an error"
    render.stderr_console().print(f"{why}: {said}", style="yellow", markup=False)
    raise typer.Exit(EXIT_INTERRUPTED) if error is None else error


def _read_input(file: Path | None) -> str:
    if file is None or is_stdin(file):
        text, where = read_stdin_if_piped(DOCUMENT, terminal=is_stdin(file)), "standard input"
    else:
        text, where = read_text_file(file, DOCUMENT), str(file)
    if not text.strip():
        holds = "holds only whitespace" if text else "is empty"  # a file of spaces is not "empty" to its owner
        raise InputError(f"nothing to summarise: {where} {holds}", hint="pass a text file or pipe text in")
    return text
