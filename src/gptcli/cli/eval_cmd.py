"""`gptcli eval perplexity FILE`: how well a model (on any backend, at any precision) predicts a text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.helpfmt import HelpGroup
from gptcli.cli.settings import resolve_settings
from gptcli.errors import EXIT_INTERRUPTED
from gptcli.textio import CHUNK, EVAL_TEXT, read_text_head

app = typer.Typer(
    help="Evaluate a model on a text.",
    no_args_is_help=True,
    cls=HelpGroup,
    rich_markup_mode=None,
)


@app.command()
def perplexity(
    file: Annotated[Path, c.path_argument("A UTF-8 text file (held-out text the model has not seen).")],
    model: c.ModelOpt = None,
    backend: c.BackendOpt = None,
    device: c.DeviceOpt = None,
    dtype: c.DtypeOpt = None,
    precision: c.PrecisionOpt = None,
    threads: c.ThreadsOpt = None,
    window: Annotated[
        int | None, typer.Option("--window", help="Tokens per window (default: min(context, 1024)).")
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="Tokens between windows (default: window/2).")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", help="Score only the first N tokens of the file.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Perplexity of a text file, with strided windows over the model's context (lower is better).

    Use it to check what a quantisation costs: run it at fp32 and at int8/int4 on the same file.

    Examples:
      gptcli eval perplexity holdout.txt
      gptcli eval perplexity holdout.txt --backend onnx --precision int4
      gptcli eval perplexity holdout.txt --window 512 --stride 256 --json
    """
    from gptcli.cli.local_run import load_runtime
    from gptcli.errors import InputError, UsageError
    from gptcli.evaluate import PerplexityInterrupted, PerplexityResult, encode_file_start, encode_text
    from gptcli.evaluate import perplexity as measure

    if max_tokens is not None and max_tokens < 2:
        raise UsageError("--max-tokens must be at least 2", hint="perplexity scores each token after the first")
    settings = resolve_settings(
        config,
        model=model,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    ).settings
    # With -n only the start of the file is read (as much as N tokens take), however large the file is.
    text, whole = read_text_head(file, EVAL_TEXT, EVAL_TEXT.max_bytes if max_tokens is None else CHUNK)
    if whole and not text.strip():
        raise InputError(f"{file} is empty", hint="pass a file with some text")
    try:
        runtime = load_runtime(settings)
        if whole:
            ids = encode_text(runtime.tokenizer, text, max_tokens)
        else:
            ids = encode_file_start(runtime.tokenizer, file, EVAL_TEXT, max_tokens or 0)  # only with -n
    except KeyboardInterrupt:  # while the model loads (a first run converts it): --json still gets its object
        if as_json:
            nothing = PerplexityResult(None, None, 0, 0, 0, window or 0, stride or 0, 0.0, partial=True)
            unknown = dict.fromkeys(("model", "backend", "device", "dtype"))  # not loaded yet
            print(json.dumps({"file": str(file), **unknown, **nothing.as_dict()}))
        raise
    del text
    console = render.stderr_console()
    progress_shown = False

    def progress(done: int, total: int) -> None:
        nonlocal progress_shown
        if console.is_terminal:
            console.print(f"\rscored {done}/{total} tokens", end="", markup=False, style="dim")
            progress_shown = True

    try:
        result = measure(runtime.backend, ids, window=window, stride=stride, progress=progress)
    except PerplexityInterrupted as stop:  # Ctrl-C: the perplexity of what was scored, marked partial
        result = stop.result
    if progress_shown:
        console.print()
    info = runtime.backend.info
    record = {
        "file": str(file),
        "model": runtime.model.name,
        "backend": runtime.backend_name,
        "device": info.device,
        "dtype": info.dtype,
        **result.as_dict(),
    }
    if as_json:
        print(json.dumps(record))
    elif result.perplexity is not None and result.mean_nll is not None:
        print(f"perplexity  {result.perplexity:.4f}")
        print(f"nll/token   {result.mean_nll:.4f}")
        print(f"tokens      {result.scored_tokens} scored of {result.total_tokens}")
        print(f"windows     {result.windows} (window {result.window}, stride {result.stride})")
        print(f"model       {runtime.model.name} · {runtime.backend_name}/{info.device} · {info.dtype}")
    if result.partial:
        sys.stdout.flush()
        said = "the perplexity is of those" if result.scored_tokens else "none scored yet"
        message = f"interrupted after {result.scored_tokens} of {result.to_score} tokens: {said}"
        console.print(message, style="yellow", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)
    render.note(f"took {result.seconds:.1f} s ({result.scored_tokens / max(result.seconds, 1e-9):.0f} tok/s)")
