"""gptcli serve --allowed-origin: web pages from other origins (a local web app, an extension) use the API (CORS).

The browser's side is in tests/test_server_browser.py; here the headers, the refusals and the flag's checks, against
`python -m gptcli serve` over the scripted backend.
"""

from __future__ import annotations

import socket

import pytest

from tests.conftest import run_cli
from tests.test_server import error_of, scripted_env, serve_process

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

APP = "http://localhost:3000"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# What OpenAI's JS SDK (v4/v5) asks a preflight to allow, besides the key and the JSON body.
SDK_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,x-stainless-package-version,"
    "x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"
)


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def preflight(url: str, origin: str, **headers: str) -> httpx.Response:
    asked = {"Origin": origin, "Access-Control-Request-Method": "POST", **headers}
    return httpx.options(url + "/v1/chat/completions", headers=asked, timeout=30)


def test_an_allowed_origins_page_gets_the_cors_answers_and_still_needs_the_key(tiny_models, tok):
    env = scripted_env(tok, "one two three")
    flags = ("--allowed-origin", APP, "--api-key", "sesame", "--log-level", "warning")
    with serve_process(tiny_models["llama"], *flags, env=env) as (_, url):
        # The preflight: no key (a browser sends none with it), the SDK's headers allowed.
        asked = preflight(url, APP, **{"Access-Control-Request-Headers": SDK_HEADERS})
        assert asked.status_code == 204, asked.text
        assert asked.headers["access-control-allow-origin"] == APP
        assert asked.headers["access-control-allow-methods"] == "GET, POST, OPTIONS"
        assert asked.headers["access-control-allow-headers"] == SDK_HEADERS
        assert int(asked.headers["access-control-max-age"]) > 0 and "Origin" in asked.headers["vary"]
        plain = preflight(url, APP)
        assert plain.headers["access-control-allow-headers"] == "Authorization, Content-Type"
        assert "access-control-allow-private-network" not in plain.headers
        # Chromium's Private Network Access: a public site's page asks before calling this machine.
        public = preflight(url, APP, **{"Access-Control-Request-Private-Network": "true"})
        assert public.headers["access-control-allow-private-network"] == "true"
        # The request itself: Sec-Fetch-Site says cross-site (it is: another port), and it is let through.
        page = {"Origin": APP, "Sec-Fetch-Site": "cross-site"}
        key = {"Authorization": "Bearer sesame"}
        answered = httpx.post(url + "/v1/chat/completions", json=BODY, headers={**page, **key}, timeout=30)
        assert answered.status_code == 200, answered.text
        assert answered.headers["access-control-allow-origin"] == APP and answered.headers["vary"] == "Origin"
        assert answered.headers["access-control-expose-headers"] == "Retry-After"  # a full queue's wait, to the SDK
        streamed = httpx.post(
            url + "/v1/chat/completions", json={**BODY, "stream": True}, headers={**page, **key}, timeout=30
        )
        assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
        assert streamed.headers["access-control-allow-origin"] == APP
        # The key still guards it, and the page can read why it was refused.
        refused = httpx.post(url + "/v1/chat/completions", json=BODY, headers=page, timeout=30)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP
        # Any other origin: today's 403, no CORS answers (its preflight is not answered for it either).
        for other in ("http://localhost:3001", "https://localhost:3000", "null"):
            refused = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Origin": other, **key}, timeout=30)
            assert refused.status_code == 403 and error_of(refused)["code"] == "cross_origin", other
            assert "--allowed-origin" in error_of(refused)["message"]
            assert "access-control-allow-origin" not in refused.headers
            assert "access-control-allow-origin" not in preflight(url, other).headers
        # Programs (no Origin) and reading are as before.
        assert httpx.post(url + "/v1/chat/completions", json=BODY, headers=key, timeout=30).status_code == 200
        listed = httpx.get(url + "/v1/models", headers={"Origin": APP, **key}, timeout=30)
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == APP


def test_any_origin_with_a_key_but_null_only_by_name(tiny_models, tok):
    env = scripted_env(tok, "one two three")
    key = {"Authorization": "Bearer sesame"}
    with serve_process(
        tiny_models["llama"], "--api-key", "sesame", "--log-level", "warning", env=env | {"GPTCLI_ALLOWED_ORIGINS": "*"}
    ) as (_, url):
        for origin in ("https://chat.example.com", "chrome-extension://abcdefghijklmnop"):
            answered = httpx.post(
                url + "/v1/chat/completions", json=BODY, headers={"Origin": origin, **key}, timeout=30
            )
            assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
        file_page = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Origin": "null", **key}, timeout=30)
        assert file_page.status_code == 403
    flags = ("--allowed-origin", "null", "--log-level", "warning")
    with serve_process(tiny_models["llama"], *flags, env=env) as (_, url):
        file_page = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Origin": "null"}, timeout=30)
        assert file_page.status_code == 200 and file_page.headers["access-control-allow-origin"] == "null"


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ("http://localhost:3000/", "did you mean --allowed-origin http://localhost:3000?"),
        ("https://app.example.com/chat?x=1", "did you mean --allowed-origin https://app.example.com?"),
        ("localhost:4000", "did you mean --allowed-origin http://localhost:4000?"),  # QA: it gave the fixed example
        ("http://localhost:99999", "e.g. --allowed-origin http://localhost:3000"),
        ("http://user@host", "e.g. --allowed-origin http://localhost:3000"),
        ("https://*.example.com", "e.g. --allowed-origin http://localhost:3000"),
    ],
)
def test_what_is_not_an_origin_is_a_usage_error_naming_the_fix(given, hint):
    result = run_cli("serve", "--port", "9", "--allowed-origin", given)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"error: allowed origin {given!r} (--allowed-origin or GPTCLI_ALLOWED_ORIGINS) is not an origin: "
        "scheme://host[:port], without a path",
        f"hint: {hint}",
    ]


@pytest.mark.parametrize("given", ["", " ", ","])
def test_an_origin_flag_that_names_none_is_a_usage_error_as_an_empty_key_is(given: str, tmp_path):
    """`--allowed-origin "$UNSET"` was silently ignored: the page it was meant for then got every POST refused."""
    origins = ("--allowed-origin", "http://localhost:3000", "--allowed-origin", given)
    result = run_cli("serve", "--port", "0", "-m", str(tmp_path / "no-model"), *origins)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"error: --allowed-origin {given!r} (or GPTCLI_ALLOWED_ORIGINS) names no origin",
        "hint: is the variable set? e.g. --allowed-origin http://localhost:3000",
    ]


def test_any_origin_on_a_keyless_server_is_a_usage_error():
    result = run_cli("serve", "--port", "9", "--allowed-origin", "*")
    assert result.returncode == 2
    assert result.stderr.decode().startswith("error: --allowed-origin '*' would let any web page make this keyless")
    assert "--api-key" in result.stderr.decode()


def test_origins_are_compared_as_browsers_write_them():
    from gptcli.server.origins import AllowedOrigins

    allowed = AllowedOrigins.parse(["HTTP://LocalHost:80, https://[::1]:8443", "vscode-webview://1abc"], None)
    assert allowed.origins == {"http://localhost", "https://[::1]:8443", "vscode-webview://1abc"}
    assert allowed.allows("http://localhost") and allowed.allows("https://[::1]:8443")
    assert not allowed.allows("http://localhost:8080") and not allowed.allows("null") and not allowed.allows(None)
    assert not AllowedOrigins.parse(["*"], "key").allows("null")
    assert not AllowedOrigins()


def test_a_name_that_dns_rebinding_points_at_this_loopback_server_is_refused(tiny_models, tok):
    """A page on rebind.attacker.example, its name turned into 127.0.0.1 by the attacker's DNS, is this server's
    own origin to the browser: it passed the cross-site check (a 200) and could read every answer."""
    import socket

    with serve_process(tiny_models["llama"], "--log-level", "warning", env=scripted_env(tok, "one two")) as (_, url):
        port = url.rsplit(":", 1)[1]
        rebound = f"rebind.attacker.example:{port}"
        page = {"Host": rebound, "Origin": f"http://{rebound}", "Sec-Fetch-Site": "same-origin"}
        refused = httpx.post(url + "/v1/chat/completions", json=BODY, headers=page, timeout=30)
        assert refused.status_code == 403, refused.text
        error = error_of(refused)
        assert error["code"] == "host_not_allowed" and error["type"] == "permission_error", error
        assert f"not for {rebound!r}" in error["message"], error
        for path in ("/v1/models", "/metrics", "/api/tags"):  # reading too: the page could read the answers
            assert httpx.get(url + path, headers={"Host": rebound}, timeout=30).status_code == 403, path
        for host in ("localhost", f"localhost:{port}", "app.localhost", f"127.0.0.1:{port}", "127.1.2.3", "[::1]"):
            answered = httpx.post(url + "/v1/chat/completions", json=BODY, headers={"Host": host}, timeout=30)
            assert answered.status_code == 200, (host, answered.text)
        with socket.create_connection(("127.0.0.1", int(port))) as sock:  # HTTP/1.0 without a Host
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.1 200")


def test_a_server_beyond_loopback_answers_any_host():
    """Listening on 0.0.0.0 (with a key), the server is reached by whatever name its network gives it."""
    import asyncio

    from gptcli.server.middleware import CrossSiteGuard

    def status(listen_host: str | None, host: bytes) -> int:
        sent: list[dict] = []

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": [(b"host", host)]}
        asyncio.run(CrossSiteGuard(app, listen_host=listen_host)(scope, None, send))
        return sent[0]["status"]

    assert status("0.0.0.0", b"gpu-box.lan:8080") == 200 and status("192.168.1.5", b"rebind.example") == 200
    assert status("127.0.0.1", b"gpu-box.lan:8080") == 403 and status("::1", b"rebind.example") == 403
    assert status("localhost", b"LOCALHOST:8080") == 200 and status("127.0.0.1", b"[::1]:8080") == 200
    # QA: ollama's clients with OLLAMA_HOST=0.0.0.0:PORT send that Host; ollama allows these names and addresses too
    for allowed in (b"0.0.0.0:8080", b"[::]:8080", b"192.168.1.5", b"printer.local", b"box.internal"):
        assert status("127.0.0.1", allowed) == 200, allowed
    assert status("127.0.0.1", socket.gethostname().encode()) == 200
    assert status("127.0.0.1", b"8.8.8.8") == 403 and status("127.0.0.1", b"local.attacker.example") == 403
