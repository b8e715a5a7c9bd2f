"""Run the app under uvicorn: bind first (fail fast, before the model loads), graceful stop on signals.

SIGTERM or Ctrl-C: uvicorn stops accepting, lets in-flight requests finish for `grace_s` seconds,
cancels the rest, then the app's lifespan stops the engine. uvicorn then re-raises the signal it
caught: SIGINT becomes KeyboardInterrupt (the CLI exits 130); SIGTERM meets the no-op handler set
here, so the process exits 0 instead of dying by the signal.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
from typing import Any

from gptcli.errors import GptcliError

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


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run_server(app: Any, sock: socket.socket, *, grace_s: float, log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C; returns normally after SIGTERM, raises KeyboardInterrupt after Ctrl-C."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=grace_s,  # type: ignore[arg-type]  (a float works: asyncio.timeout)
        lifespan="on",
        server_header=False,
    )
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, _ignore_signal)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise GptcliError("the server did not start", hint="see the log lines above")


def _ignore_signal(signum: int, frame: Any) -> None:
    """Where uvicorn's re-raised SIGTERM lands once the graceful shutdown is over."""
