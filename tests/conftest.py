"""Fixtures: tiny random-weight models (2-layer GPT-2 and Llama) with a tokenizer trained here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/NAME.py imported as the module NAME (the fuzzers' seeded subsets run their code in the suite), with
    scripts/ on the path, as when it runs, for the siblings it imports (fuzz_limits)."""
    import importlib.util

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Once upon a time there was a tiny model that wanted to write poems about autumn leaves.",
    "The capital of France is Paris. The capital of Italy is Rome. Stop here: END.",
    "def add(a, b):\n    return a + b\n",
    "中文测试：你好，世界！ Emoji: 🙂🚀🍁 and accents: café, naïve, Zürich.",
    "ROMEO: But soft, what light through yonder window breaks? It is the east.",
] * 20


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _save_tokenizer(tok, folder: Path, *, chat_template: str | None, eos: str) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)


def _sharpen(model) -> None:
    """Random init gives near-uniform logits; scale the matrices so greedy choices are decisive."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)


SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TRAIN_TEXT = (
    "ROMEO: But soft, what light through yonder window breaks?\n"
    "It is the east, and Juliet is the sun.\n"
    "JULIET: O Romeo, Romeo, wherefore art thou Romeo?\n"
) * 60


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small training text: 20,000 characters of Shakespeare (or a repeated verse without shared/)."""
    path = tmp_path / "corpus.txt"
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20000] if SHAKESPEARE.is_file() else TRAIN_TEXT
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def build_tiny_models(root: Path) -> dict[str, Path]:
    """The tiny GPT-2 and Llama in `root` (scripts/fuzz_server.py serves the Llama too)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _train_tokenizer()
    vocab = tok.get_vocab_size()
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=96, vocab_size=vocab, bos_token_id=eot, eos_token_id=eot)
    )
    _sharpen(gpt2)
    gpt2_dir = root / "tiny-gpt2"
    gpt2.save_pretrained(gpt2_dir)
    _save_tokenizer(tok, gpt2_dir, chat_template=None, eos="<|endoftext|>")

    torch.manual_seed(1)
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=eot,
            eos_token_id=im_end,
            pad_token_id=eot,
        )
    )
    _sharpen(llama)
    llama_dir = root / "tiny-llama"
    llama.save_pretrained(llama_dir)
    _save_tokenizer(tok, llama_dir, chat_template=CHATML, eos="<|im_end|>")
    return {"gpt2": gpt2_dir, "llama": llama_dir}


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny llama as a GGUF file (float32 tensors): its conversion takes seconds."""
    from tests.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


SHARED_KERNELS = REPO / ".cache" / "test-kernels"


@pytest.fixture
def own_kernels(isolated_home, monkeypatch) -> Path:
    """This test's kernels folder: its home's own (GPTCLI_KERNELS_DIR unset), not the run's shared one."""
    monkeypatch.delenv("GPTCLI_KERNELS_DIR")
    return isolated_home / "cache" / "kernels"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own gptcli home and user config, and no stray GPTCLI_* settings."""
    for key in list(os.environ):
        if key.startswith("GPTCLI_") and key not in {"GPTCLI_TEST_DEFAULT_HOME"}:
            monkeypatch.delenv(key, raising=False)
    home = tmp_path / "gptcli-home"
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    # The torch backend builds gptcli's native library (int8_native.c) on first use: once a run, not once a test.
    monkeypatch.setenv("GPTCLI_KERNELS_DIR", str(SHARED_KERNELS))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    return home


@pytest.fixture(scope="session")
def default_model_home(tmp_path_factory) -> Path:
    """A gptcli home holding the converted default model, shared by the integration tests.

    It lives under the repo's .cache/ so a second test run reuses the conversion.
    """
    home = Path(os.environ.get("GPTCLI_TEST_DEFAULT_HOME", REPO / ".cache" / "test-home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="module")
def default_model(default_model_home):
    """The default model converted into the shared test home (GPTCLI_HOME pointed there only meanwhile)."""
    old = os.environ.get("GPTCLI_HOME")
    os.environ["GPTCLI_HOME"] = str(default_model_home)
    try:
        from gptcli.models import resolve_model

        return resolve_model("smollm2-135m-instruct")
    finally:
        if old is None:
            os.environ.pop("GPTCLI_HOME")
        else:
            os.environ["GPTCLI_HOME"] = old


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) → a folder on a tmpfs of that size ('256k'), to fill a disk for real; unmounted after the test.
    Needs root (and a kernel that lets it mount): the test is skipped elsewhere."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root (and mount)")
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def read_only_disk(small_disk) -> Path:
    """A folder on a tmpfs mounted read-only (root only, skipped elsewhere): writes in it fail with EROFS."""
    folder = small_disk("64k")
    done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount a tmpfs read-only here: {done.stderr.decode().strip()}")
    return folder


def fill_up(folder: Path) -> None:
    """Fill the disk that holds `folder` to its last byte (a small_disk), with a file named `filler`."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: full, to its last byte
        pass
    finally:
        os.close(fd)


def run_cli(
    *args: str,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess:
    """Run the real `gptcli` program in a subprocess (the environment of the calling test)."""
    data = input.encode() if isinstance(input, str) else input
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gptcli", *args],
        input=data if data is not None else b"",
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
    )


class CannedHandler(BaseHTTPRequestHandler):
    """A hand-written test server's handler: no log lines, and `answer` sends one whole body."""

    def log_message(self, *args: Any) -> None:
        pass

    def answer(self, status: int, body: bytes, content_type: str = "application/json", *, length: bool = True) -> None:
        """The status, the body's type (and, unless `length` is False, its length: the body then ends where the
        connection closes, as an HTTP/1.0 stream does), then the body."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(ThreadingHTTPServer):
    """A test server whose client hangs up on purpose (a timeout, an endless or slow answer): that is what the
    test looks at, not a traceback for stderr; any other error in a handler is still printed."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port in a thread: its root URL (http://127.0.0.1:PORT)."""
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def reads(constraint, text: str) -> bool:
    """Whether a constrained reply may be exactly `text` (a matcher fed one byte at a time)."""
    import llguidance

    from gptcli.constraints import grammar
    from gptcli.schema_width import _bytes_tokenizer

    matcher = llguidance.LLMatcher(_bytes_tokenizer(), grammar(constraint), log_level=0)
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()
