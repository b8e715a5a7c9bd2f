"""Run the app under uvicorn: bind first (fail fast, before the model loads), graceful stop on signals.

SIGTERM, SIGHUP (the terminal closed) or Ctrl-C: uvicorn stops accepting; the engine lets in-flight requests
finish for `grace_s` seconds and cancels the rest (their streams end with an error event, non-streamed ones
get 503); then the app's lifespan stops the engine's thread. uvicorn then re-raises the signal it caught:
SIGINT becomes KeyboardInterrupt (the CLI exits 130); SIGTERM meets the no-op handler set
here, so the process exits 0 instead of dying by the signal. A second Ctrl-C during that wait ends the
process at once (exit 130): uvicorn's own "force exit" would cancel the tasks in flight, print a
traceback for each and answer their clients with a bare 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcli.errors import EXIT_INTERRUPTED, TERMINATING_SIGNALS, GptcliError, InputError, UsageError, after_hangup
from gptcli.server.descriptors import connection_cap, quiet_accept_errors

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a one-line error saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise GptcliError(f"cannot listen on {host}:{port}: {exc}", hint="check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise GptcliError(f"cannot listen on {host}:{port}: {reason}", hint="choose another --port") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, *, tls: bool = False) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


@dataclass(frozen=True)
class TlsFiles:
    """The certificate (PEM, its chain after it) and private key that HTTPS is served with."""

    certfile: Path
    keyfile: Path


SELF_SIGNED = (
    "a self-signed pair for this machine: openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem "
    "-days 365 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
)


def tls_files(certfile: Path | None, keyfile: Path | None) -> TlsFiles | None:
    """--ssl-certfile and --ssl-keyfile checked as uvicorn will load them (so a bad one is a one-line error before
    the model loads, not a traceback after), or None for plain HTTP."""
    if certfile is None and keyfile is None:
        return None
    if certfile is None or keyfile is None:
        given, missing = ("--ssl-certfile", "--ssl-keyfile") if keyfile is None else ("--ssl-keyfile", "--ssl-certfile")
        raise UsageError(f"{given} needs {missing} too: HTTPS takes a certificate and its private key")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        try:
            with path.open("rb") as file:
                file.read(1)
        except OSError as exc:
            raise InputError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None
    try:
        ssl.create_default_context(cafile=str(certfile))
    except ssl.SSLError:
        raise InputError(f"--ssl-certfile {certfile} holds no PEM certificate", hint=SELF_SIGNED) from None
    asked: list[bool] = []

    def no_passphrase() -> bytes:  # else OpenSSL would ask for one on the terminal
        asked.append(True)
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=no_passphrase)
    except ssl.SSLError as exc:
        if asked:
            raise InputError(
                f"the key in --ssl-keyfile {keyfile} is encrypted, and gptcli serve takes no passphrase",
                hint=f"decrypt it: openssl pkey -in {keyfile} -out key.pem",
            ) from None
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise InputError(
                f"the key in --ssl-keyfile {keyfile} is not the one of the certificate in --ssl-certfile {certfile}",
                hint="pass the private key the certificate was made with",
            ) from None
        raise InputError(f"--ssl-keyfile {keyfile} holds no PEM private key", hint=SELF_SIGNED) from None
    return TlsFiles(certfile, keyfile)


# uvicorn's own limit, past ours: by then the engine has cancelled what was left and the streams ended.
BACKSTOP_S = 3.0
# Open connections at once; past it uvicorn answers 503. --max-queue bounds the requests the engine holds, but a
# client that stops reading keeps its finished stream's output in memory: this bounds how many can. Fewer where the
# limit on open files leaves less room (descriptors.connection_cap).
MAX_CONNECTIONS = 1024
# A request's headers must be whole within this long of the connection opening or of the answer before (nginx's
# client_header_timeout): a client that sent nothing, half a request line or a header a minute held a connection,
# and a thousand such ones shut everyone else out with 503s. Idle keep-alive stays uvicorn's (5 s), bodies BodyLimit's.
HEADER_TIMEOUT_S = 30.0


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (h11, or httptools where installed) that closes a connection whose next
    request's headers are not whole `timeout_s` after it opened or its last answer ended."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_header_timer()
            super().connection_lost(exc)

        def waiting_for_headers(self) -> bool:
            """No request is being answered (none yet, or the last one's answer is complete) on an open connection."""
            return not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete)

        def watch_headers(self) -> None:
            """Arm the timer while a request's headers are due, and stop it once they came (a request began)."""
            if not self.waiting_for_headers():
                self.stop_header_timer()
            elif self.header_timer is None:
                self.header_timer = self.loop.call_later(timeout_s, self.headers_too_late)

        def stop_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_too_late(self) -> None:
            self.header_timer = None
            if self.waiting_for_headers():
                self.transport.close()

    return HeaderTimeout


def make_server(
    app: Any,
    *,
    grace_s: float,
    drain: Callable[[float], None] | None = None,
    log_level: str = "info",
    on_ready: Callable[[], None] | None = None,
    max_connections: int = MAX_CONNECTIONS,
    tls: TlsFiles | None = None,
) -> Any:
    """A uvicorn.Server for the app (HTTPS with `tls`, checked by tls_files). When shutdown begins,
    `drain(grace_s)` runs in a thread (the engine's stop: refuse new work, let running sequences finish for
    grace_s, cancel the rest), so every stream ends cleanly, before uvicorn's own timeout would cut the
    connections.
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            quiet_accept_errors(asyncio.get_running_loop())
            await super().startup(sockets=sockets)
            if self.started and on_ready is not None:
                on_ready()

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop now, not after the grace
                cut = len(self.server_state.tasks)
                note = f": {cut} request(s) in flight cut off" if cut else ""
                sys.stderr.write(f"stopped at once{note}\n")
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if drain is not None:
                threading.Thread(target=drain, args=(grace_s,), name="gptcli-drain", daemon=True).start()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=grace_s + BACKSTOP_S,  # type: ignore[arg-type]  (a float works: asyncio.timeout)
        lifespan="on",
        server_header=False,
        http=header_timeout_protocol(HEADER_TIMEOUT_S),
        ssl_certfile=tls and tls.certfile,
        ssl_keyfile=tls and tls.keyfile,
    )
    config.limit_concurrency = connection_cap(max_connections)  # once Config has set up the log it may write to
    return Server(config)


def run_server(server: Any, sock: socket.socket) -> None:
    """Serve until SIGTERM or Ctrl-C; returns normally after SIGTERM, raises KeyboardInterrupt after Ctrl-C."""

    def on_sigterm(signum: int, frame: Any) -> None:
        # Before uvicorn takes the signal over: stop now (nothing is in flight). After its graceful
        # shutdown it re-raises SIGTERM here: return, so the process exits 0 rather than by the signal.
        if not server.started:
            raise SystemExit(0)

    def on_sighup(signum: int, frame: Any) -> None:
        # The terminal closed (uvicorn does not take SIGHUP, which would kill the process as kill -9 does): the
        # same graceful stop as SIGTERM, with the terminal's output sent to /dev/null, where writing cannot fail.
        after_hangup(signum)
        on_sigterm(signum, frame)
        server.handle_exit(signal.SIGTERM, frame)

    handlers = {signal.SIGTERM: on_sigterm, **{sig: on_sighup for sig in TERMINATING_SIGNALS if sig != signal.SIGTERM}}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise GptcliError("the server did not start", hint="see the log lines above")


class ThreadedServer:
    """Serve an app from a background thread on a free loopback port: `with ThreadedServer(app, ...) as url:`.

    For tests and embedding; signals stay with the main thread. Leaving the block shuts the server
    down as SIGTERM would (see make_server).
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        grace_s: float = 2.0,
        drain: Callable[[float], None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = make_server(
            app, grace_s=grace_s, drain=drain, log_level="warning", max_connections=max_connections
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise GptcliError("the server thread did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
