"""Which other sites' web pages may use the server (`--allowed-origin`, GPTCLI_ALLOWED_ORIGINS).

By default only the server's own chat page and programs may (a POST from another origin is a 403: see
middleware.CrossSiteGuard). A browser front end served from elsewhere (a local web app, an extension, an
editor's webview) is let in by naming its origin; the CORS headers it needs come from middleware.CorsHeaders.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gptcli.errors import UsageError

ANY = "*"
NULL = "null"  # the origin of a file:// page or a sandboxed frame: any such page shares it
DEFAULT_PORTS = {"http": "80", "https": "443"}
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?)(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
EXAMPLE = "e.g. --allowed-origin http://localhost:3000"


def origin_of(text: str) -> str | None:
    """`text` as a browser writes an origin (scheme://host[:port], lower case, no default port), or None if it is
    not one: a path, a query, user info, a port out of range or an empty host make it something else."""
    match = _ORIGIN.fullmatch(text)
    if match is None:
        return None
    scheme, host, port = match["scheme"].lower(), match["host"].lower(), match["port"]
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
    if port is not None and not 0 < int(port) < 65536:
        return None
    if port is None or DEFAULT_PORTS.get(scheme) == port.lstrip("0"):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


@dataclass(frozen=True)
class AllowedOrigins:
    """The origins whose pages may use the server besides its own; `any_origin` for `*` (never `null`)."""

    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    def __bool__(self) -> bool:
        return self.any_origin or bool(self.origins)

    def answer_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """The CORS headers every answer to a page of `origin` carries when it is allowed (none otherwise): it may
        read the answer, and Retry-After on a 503 or a 429."""
        if origin is None or not self.allows(origin):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", b"Retry-After"),
        ]

    def allows(self, origin: str | None) -> bool:
        if origin is None:
            return False
        if origin == NULL:
            return NULL in self.origins
        written = origin_of(origin)
        return written is not None and (self.any_origin or written in self.origins)

    @classmethod
    def parse(cls, values: Iterable[str], api_key: str | None) -> AllowedOrigins:
        """The origins given to `--allowed-origin` (each value may list several, separated by commas or spaces),
        checked: one that is not an origin, an empty one (`--allowed-origin "$UNSET"`), or `*` on a server without a
        key, is a UsageError."""
        origins: set[str] = set()
        any_origin = False
        parts = {value: [part for part in re.split(r"[,\s]+", value) if part] for value in values}
        if (empty := next((value for value, named in parts.items() if not named), None)) is not None:
            raise UsageError(
                f"--allowed-origin {empty!r} (or GPTCLI_ALLOWED_ORIGINS) names no origin",
                hint=f"is the variable set? {EXAMPLE}",
            )
        for text in (part for named in parts.values() for part in named):
            if text == ANY:
                any_origin = True
            elif text.lower() == NULL:
                origins.add(NULL)
            else:
                origins.add(_checked(text))
        if any_origin and not api_key:
            raise UsageError(
                "--allowed-origin '*' would let any web page make this keyless server generate",
                hint=f"pass --api-key KEY too, or name the origins: {EXAMPLE}",
            )
        return cls(frozenset(origins), any_origin)


def _checked(text: str) -> str:
    origin = origin_of(text)
    if origin is not None:
        return origin
    scheme, sep, rest = text.partition("://")
    if not sep:  # `localhost:4000`: a page's origin has its scheme (http:// for a local dev server)
        scheme, rest = "http", text
    cut = origin_of(f"{scheme}://{re.split(r'[/?#]', rest, maxsplit=1)[0]}")
    raise UsageError(
        f"allowed origin {text!r} (--allowed-origin or GPTCLI_ALLOWED_ORIGINS) is not an origin: "
        "scheme://host[:port], without a path",
        hint=f"did you mean --allowed-origin {cut}?" if cut else EXAMPLE,
    )
