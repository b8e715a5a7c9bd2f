"""`gptcli generate`: stream a completion to stdout."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.inputs import gather_prompt
from gptcli.cli.settings import constrain, output_constraint, resolve_settings
from gptcli.config import with_drawn_seed
from gptcli.errors import UsageError


def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt. Combined after stdin when both are given.")] = None,
    file: Annotated[
        Path | None, c.path_option("--file", "-f", help="Read the prompt from a file (- is stdin).")
    ] = None,
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
    max_tokens: c.MaxTokensOpt = None,
    seed: c.SeedOpt = None,
    stop: c.StopOpt = None,
    repetition_stop: c.RepetitionStopOpt = None,
    system: c.SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as is, without the chat template.")] = False,
    chat_template: c.ChatTemplateOpt = None,
    on_overflow: c.OverflowOpt = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template", "-T", help="A prompt template (`gptcli templates list`).", autocompletion=c.complete_template
        ),
    ] = None,
    var: Annotated[list[str] | None, typer.Option("--var", help="A template variable NAME=VALUE (repeatable).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Translate into LANG (the translate template).")] = None,
    question: Annotated[
        str | None, typer.Option("--question", help="Answer QUESTION from the input (the qa template).")
    ] = None,
    batch: Annotated[
        Path | None, c.path_option("--batch", help="A JSONL file of requests (prompt or messages per line).")
    ] = None,
    output: Annotated[
        Path | None,
        c.path_option(
            "--output", "-o", help="With --batch: write results here (a new or empty file; --resume continues one)."
        ),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="With --batch: skip ids already in --output.")] = False,
    parallel: c.ParallelOpt = None,
    kv_budget: c.KvBudgetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    json_schema: c.JsonSchemaOpt = None,
    output_format: c.FormatOpt = None,
    regex: c.RegexOpt = None,
    grammar: c.GrammarOpt = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings on stderr.")] = False,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Generate text from a prompt, streaming it to stdout.

    Examples:
      gptcli generate "Write a haiku about autumn."
      gptcli generate -f prompt.txt --max-tokens 200 --temperature 0.8 --seed 7
      cat notes.txt | gptcli generate "Rewrite this more politely:"
      gptcli generate -f article.txt --template translate --var to=French
      gptcli generate -f article.txt --to French
      gptcli generate -f report.txt --question "Who signed it?"
      gptcli generate --batch prompts.jsonl -o results.jsonl --parallel 8
      gptcli generate --batch prompts.jsonl --url http://127.0.0.1:8080/v1
      gptcli generate "hi" --url http://127.0.0.1:8080/v1    # on that server
      gptcli generate -f invoice.txt --json-schema schema.json
      gptcli generate -f mail.txt --grammar yes-no.gbnf    # root ::= "yes" | "no"
    """
    from gptcli.cli.remote_run import check_client_flags

    check_client_flags(
        url,
        timeout,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        kv_budget=kv_budget,
        on_overflow=on_overflow,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
    )
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
        max_tokens=max_tokens,
        seed=seed,
        stop=stop,
        repetition_stop=repetition_stop,
        system=system,
        chat_template=chat_template,
        on_overflow=on_overflow,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    settings = resolved.settings
    if batch is not None:
        from gptcli.cli.batch_run import run_batch_file

        if prompt is not None or file is not None or template is not None or to or question or var:
            raise UsageError("--batch takes its prompts from the file", hint="drop the prompt, -f, --template, --var")
        if raw or as_json or stats:  # each line says `"raw": true` itself; its results are JSON lines already
            raise UsageError("--raw, --json and --stats do not go with --batch", hint='a line sets "raw": true itself')
        settings = constrain(settings, structured)  # every row gets the run's constraint
        remote = None
        if url is not None:
            from gptcli.cli.remote_run import open_remote

            remote = open_remote(url, api_key, model, timeout)
        options = dict(output=output, resume=resume, parallel=parallel, kv_budget=kv_budget, remote=remote)
        return run_batch_file(settings, batch, **options)
    if output is not None or resume or kv_budget is not None:
        raise UsageError("--output, --resume and --kv-budget go with --batch", hint="one completion needs none of them")
    from gptcli.templates import with_shorthands

    template, var = with_shorthands(template, var or [], to=to, question=question)
    chosen = None
    if template is not None:
        from gptcli.templates import apply_sampling_defaults, get_template, parse_vars

        chosen = get_template(template)
        variables = parse_vars(var or [])
        chosen.bind(variables)  # a missing or unknown variable fails here, before reading input or loading
        settings = apply_sampling_defaults(resolved, chosen)
    elif var:
        raise UsageError("--var needs --template", hint="e.g. --template translate --var to=French")
    text = gather_prompt(prompt, file)
    if chosen is not None:
        system_text, text = chosen.render(text, variables)
        if resolved.sources["system"] == "default" and system_text:
            if raw:
                text = f"{system_text}\n\n{text}"
            else:
                settings = replace(settings, system=system_text)
    if raw:
        settings = without_chat_turn(settings, resolved.sources)
    settings = with_drawn_seed(constrain(settings, structured))  # local or --url, --json reports the seed
    if url is not None:
        from gptcli.cli.remote_run import open_remote, run_remote_generation

        remote = open_remote(url, api_key, model, timeout)
        return run_remote_generation(remote, settings, text, raw=raw, as_json=as_json, show_stats=stats)
    from gptcli.cli.local_run import run_generation

    run_generation(settings, text, raw=raw, as_json=as_json, show_stats=stats)


def without_chat_turn(settings: Any, sources: Mapping[str, str]) -> Any:
    """--raw sends the text as is: no system message, no chat template (neither file is read). A flag given for
    either is said to be ignored; one from a config file or the environment is for chat turns, and is quietly left."""
    for key, flag in (("chat_template", "--chat-template"), ("system", "--system")):
        if getattr(settings, key) and sources[key] == "flag":
            render.warn(f"{flag} is ignored with --raw")
    return replace(settings, system=None, chat_template=None)
