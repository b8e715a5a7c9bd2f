"""`gptcli serve`: an OpenAI-compatible HTTP server and chat page over the batched engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.cli.settings import resolve_settings
from gptcli.errors import UsageError


def serve(
    model: c.ModelOpt = None,
    backend: c.BackendOpt = None,
    device: c.DeviceOpt = None,
    dtype: c.DtypeOpt = None,
    precision: c.PrecisionOpt = None,
    threads: c.ThreadsOpt = None,
    chat_template: c.ChatTemplateOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (others than loopback need a key).")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int, typer.Option("--port", "-p", help="Port to listen on (0: any free port).", min=0, max=65535)
    ] = 8080,
    parallel: Annotated[int, typer.Option("--parallel", help="Sequences decoded together in one batch.", min=1)] = 8,
    kv_budget: Annotated[
        str | None,
        typer.Option("--kv-budget", help="KV-cache room across running sequences: tokens (16384) or a size (2GiB)."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Waiting requests before new ones get 503.", min=0)
    ] = 256,
    prefix_cache: Annotated[
        int | None,
        typer.Option(
            "--prefix-cache",
            help="Finished requests whose prompt KV is kept for prompts that start alike (0: off; default: "
            "--parallel on the CPU, 0 on CUDA).",
            min=0,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="GPTCLI_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    insecure_no_key: Annotated[
        bool, typer.Option("--insecure-no-key", help="Allow a non-loopback --host without --api-key.")
    ] = False,
    allowed_origins: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-origin",
            envvar="GPTCLI_ALLOWED_ORIGINS",
            help="Let web pages from this origin use the API (CORS), e.g. http://localhost:3000; repeatable.",
        ),
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option("--ssl-certfile", help="Serve HTTPS with this certificate (PEM).", dir_okay=False)
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option("--ssl-keyfile", help="The certificate's private key (PEM).", dir_okay=False)
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds in-flight requests get to finish on shutdown.", min=0)
    ] = 10.0,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, in bytes.", min=1)] = 1 << 20,
    served_name: Annotated[
        str | None, typer.Option("--served-model-name", help="The model id clients see (default: its name).")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="critical | error | warning | info | debug.")] = "info",
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions) with a chat page at /.

    Requests join one running batch (continuous batching). Sampling defaults come from your config.

    Examples:
      gptcli serve
      gptcli serve -m ./runs/mygpt --backend onnx --precision int4 --parallel 8
      gptcli serve --host 0.0.0.0 --port 9000 --api-key "$KEY"
      gptcli serve --allowed-origin http://localhost:3000 --api-key "$KEY"
      gptcli serve --ssl-certfile cert.pem --ssl-keyfile key.pem
      curl localhost:8080/v1/chat/completions \\
        -d '{"model":"default","messages":[{"role":"user","content":"hi"}]}'
    """
    from gptcli.server.origins import AllowedOrigins
    from gptcli.server.serving import bind_socket, is_loopback, tls_files, url_of

    if not math.isfinite(grace):
        raise UsageError(f"--grace must be a number of seconds, not {grace}", hint="e.g. --grace 10")
    if log_level not in {"critical", "error", "warning", "info", "debug"}:
        raise UsageError(f"--log-level must be one of critical, error, warning, info, debug, got {log_level!r}")
    if api_key is not None:
        check_api_key(api_key)
    if not is_loopback(host) and not api_key and not insecure_no_key:
        raise UsageError(
            f"listening on {host} would let anyone who can reach it use the model",
            hint="pass --api-key KEY (or set GPTCLI_API_KEY), or --insecure-no-key if that is what you want",
        )
    origins = AllowedOrigins.parse(allowed_origins or (), api_key)
    tls = tls_files(ssl_certfile, ssl_keyfile)
    settings = resolve_settings(
        config,
        model=model,
        backend=backend,
        device=device,
        dtype=dtype,
        precision=precision,
        threads=threads,
        chat_template=chat_template,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    ).settings
    sock = bind_socket(host, port)  # before loading: a busy port fails in a second, not after the model loads
    try:
        app = build_app(
            settings, parallel, kv_budget, max_queue, api_key, max_body, served_name, prefix_cache, origins, host
        )
        from gptcli.server.serving import make_server, run_server

        def ready() -> None:
            render.note(f"serving on {url_of(sock, tls=tls is not None)} (chat page /, API /v1) · Ctrl-C to stop")

        engine = app.state.gptcli.engine
        server = make_server(app, grace_s=grace, drain=engine.stop, log_level=log_level, on_ready=ready, tls=tls)
        run_server(server, sock)
    finally:
        sock.close()


def check_api_key(key: str) -> None:
    """A key clients can send: an empty one (an unset variable?) would leave the server open, and one an HTTP
    header cannot carry (beyond printable ASCII, spaces) would refuse every client. Never shown: it is a secret."""
    if not key:
        raise UsageError("--api-key is empty, which would leave the server open", hint="is the variable set?")
    if not (key.isascii() and key.isprintable() and " " not in key):
        raise UsageError(
            "the API key (--api-key or GPTCLI_API_KEY) holds characters an HTTP header cannot carry, so no "
            "client could send it",
            hint="use printable ASCII without spaces, e.g. from `openssl rand -hex 16`",
        )


def build_app(
    settings, parallel, kv_budget, max_queue, api_key, max_body, served_name, prefix_cache=None, origins=None, host=None
):
    """Load the model, build the engine around it, and the ASGI app around both."""
    import time

    from gptcli.cli.local_run import load_runtime
    from gptcli.engine import Engine, EngineLimits, default_prefix_cache, parse_kv_budget
    from gptcli.server.app import ServerConfig, create_app
    from gptcli.server.metrics import Metrics
    from gptcli.server.origins import AllowedOrigins
    from gptcli.server.state import ServerState

    runtime = load_runtime(settings)
    budget = parse_kv_budget(kv_budget, runtime.backend.info.kv_bytes_per_token)
    if prefix_cache is None:
        prefix_cache = default_prefix_cache(runtime.backend, parallel)
    limits = EngineLimits(max_running=parallel, kv_budget_tokens=budget, max_queue=max_queue, prefix_cache=prefix_cache)
    engine = Engine(runtime.backend, runtime.tokenizer, limits)
    state = ServerState(
        engine=engine,
        tokenizer=runtime.tokenizer,
        model_name=served_name or runtime.model.name,
        context_length=runtime.backend.info.context_length,
        defaults=settings.sampling,
        created=int(time.time()),
        metrics=Metrics(engine.snapshot),
    )
    config = ServerConfig(
        api_key=api_key, max_body_bytes=max_body, allowed_origins=origins or AllowedOrigins(), host=host
    )
    return create_app(state, config)
