"""gptcli serve --ssl-certfile/--ssl-keyfile: HTTPS, its clients (httpx, OpenAI's SDK, `gptcli generate --url`),
and the certificate and key that cannot be used, refused in one line before the model loads."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_server import scripted_env, serve_process

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

OPENSSL = shutil.which("openssl")
if OPENSSL is None:
    pytest.skip("no openssl program to make a self-signed certificate with", allow_module_level=True)
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    names = ("-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2", *names],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "server")


@pytest.fixture(scope="module")
def tok(tiny_models):
    from gptcli.tokenizer import Tokenizer

    return Tokenizer(tiny_models["llama"])


def test_https_with_the_certificate_trusted(tiny_models, tok, pair, monkeypatch):
    cert, key = pair
    env = scripted_env(tok, "Hello over TLS.")
    flags = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--log-level", "warning")
    with serve_process(tiny_models["llama"], *flags, env=env) as (_, url):  # its line says https://
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(url + "/health", verify=trusted, timeout=30).json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/health", timeout=30)  # the system's CAs do not know it
        # gptcli's client mode: SSL_CERT_FILE trusts it (the scripted reply is the first request's); without, the
        # error says how.
        generate = ("generate", "hi", "--url", url + "/v1", "-n", "40")
        result = run_cli(*generate, env={"SSL_CERT_FILE": str(cert)})
        assert result.returncode == 0 and result.stdout.decode() == "Hello over TLS.\n", result.stderr
        # OpenAI's SDK (over httpx) takes SSL_CERT_FILE too.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="tiny-llama", **BODY)
        # A whole answer came back over TLS. Its text is a sample from flat logits (the script was the first
        # request's), which ends at once when the first token drawn is the end of text (a CI run drew it).
        assert reply.model == "tiny-llama" and reply.choices[0].finish_reason in {"stop", "length"}
        monkeypatch.delenv("SSL_CERT_FILE")
        result = run_cli(*generate, env={"SSL_CERT_FILE": ""})
        error, hint = result.stderr.decode().splitlines()[:2]
        assert result.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in error
        assert hint.startswith("hint: a server of yours with a self-signed certificate? trust it: SSL_CERT_FILE=")
        result = run_cli(*generate[:3], url.replace("https", "http", 1) + "/v1", env={"SSL_CERT_FILE": str(cert)})
        assert result.returncode == 1 and result.stderr.decode().startswith("error: cannot connect to http://")
        assert result.stderr.decode().splitlines()[1] == "hint: does the server speak HTTPS? then use https://"


def test_a_url_with_https_to_a_plain_server_says_to_use_http(tiny_models, tok):
    env = scripted_env(tok, "plain")
    with serve_process(tiny_models["llama"], "--log-level", "warning", env=env) as (_, url):
        result = run_cli("generate", "hi", "--url", url.replace("http", "https", 1) + "/v1")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[1] == "hint: the server speaks plain HTTP: use http://"


def test_a_certificate_or_key_that_cannot_be_used_is_one_line_before_loading(pair, tmp_path):
    cert, key = pair
    other_cert, other_key = self_signed(tmp_path, "other")
    encrypted = tmp_path / "encrypted.pem"
    subprocess.run([OPENSSL, "pkey", "-in", key, "-aes256", "-passout", "pass:x", "-out", encrypted], check=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (["--ssl-certfile", cert], 2, "error: --ssl-certfile needs --ssl-keyfile too: HTTPS takes a certificate"),
        (["--ssl-keyfile", key], 2, "error: --ssl-keyfile needs --ssl-certfile too: HTTPS takes a certificate"),
        (["--ssl-certfile", missing, "--ssl-keyfile", key], 6, f"error: cannot read --ssl-certfile {missing}: No such"),
        (["--ssl-certfile", junk, "--ssl-keyfile", key], 6, f"error: --ssl-certfile {junk} holds no PEM certificate"),
        (["--ssl-certfile", key, "--ssl-keyfile", cert], 6, f"error: --ssl-certfile {key} holds no PEM certificate"),
        (["--ssl-certfile", cert, "--ssl-keyfile", junk], 6, f"error: --ssl-keyfile {junk} holds no PEM private key"),
        (
            ["--ssl-certfile", cert, "--ssl-keyfile", other_key],
            6,
            f"error: the key in --ssl-keyfile {other_key} is not",
        ),
        (["--ssl-certfile", cert, "--ssl-keyfile", encrypted], 6, f"error: the key in --ssl-keyfile {encrypted} is en"),
    ]
    for flags, code, start in cases:
        # A model that does not exist: the check comes before it would be looked for (exit 5).
        result = run_cli("serve", "-m", str(tmp_path / "no-model"), "--port", "0", *map(str, flags), timeout=60)
        stderr = result.stderr.decode()
        assert result.returncode == code and stderr.startswith(start), (flags, stderr)
        assert "Traceback" not in stderr and len(stderr.splitlines()) <= 2, stderr
    assert other_cert.is_file()
