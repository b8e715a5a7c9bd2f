"""Shell completions: committed scripts are up to date, and a real <TAB> round-trip stays light."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "onnxruntime", "transformers")


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_completions", REPO / "scripts" / "gen_completions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_completions_are_fresh():
    """Regenerating from the Typer app must give exactly the committed files."""
    gen = _gen_module()
    for path, text in gen.expected_files().items():
        assert path.is_file(), f"{path.name} is missing: run .venv/bin/python scripts/gen_completions.py"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is stale: run .venv/bin/python scripts/gen_completions.py"
        )


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch):
    gen = _gen_module()
    monkeypatch.setattr(gen, "OUT_DIR", tmp_path)
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    (tmp_path / "gptcli.fish").write_text("# edited by hand\n")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


def test_zsh_script_starts_with_compdef():
    assert (REPO / "completions" / "gptcli.zsh").read_text().startswith("#compdef gptcli\n")


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `-X importtime` output lines: 'import time: self | cumulative | name'."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def _heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def _complete(words: list[str], env_extra: dict[str, str] | None = None) -> tuple[list[str], set[str], float]:
    """One round-trip through the committed bash script: bash → gptcli → candidates."""
    venv_bin = str(Path(sys.executable).parent)
    script = REPO / "completions" / "gptcli.bash"
    array = " ".join(f"'{w}'" for w in words)
    program = (
        f"source '{script}'; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; "
        "_gptcli_completion gptcli; printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPROFILEIMPORTTIME": "1"}
    env.update(env_extra or {})
    start = time.perf_counter()
    result = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    return [w for w in result.stdout.splitlines() if w], imported_modules(result.stderr), elapsed


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_backend_completion_round_trip_imports_no_heavy_module(capsys):
    candidates, modules, elapsed = _complete(["gptcli", "generate", "--backend", ""])
    assert "torch" in candidates
    assert "gptcli.cli.app" in modules, "the round-trip did not reach gptcli"
    assert not _heavy(modules), f"completion imported {_heavy(modules)}"
    with capsys.disabled():
        print(f"\n[completion round-trip: {elapsed * 1000:.0f} ms]", file=sys.stderr)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_model_completion_lists_catalogue_and_cache(isolated_home):
    hub_cache = isolated_home / "cache" / "models" / "hub--org--tiny"
    hub_cache.mkdir(parents=True)
    (hub_cache / "gptcli-source.json").write_text('{"source": "hub:org/tiny"}')
    candidates, modules, _ = _complete(["gptcli", "generate", "--model", ""])
    assert {"smollm2-135m-instruct", "smollm2", "default", "org/tiny"} <= set(candidates)
    assert not _heavy(modules)
    only_sm, _, _ = _complete(["gptcli", "generate", "-m", "smol"])
    assert set(only_sm) == {"smollm2-135m-instruct", "smollm2"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_subcommand_completion():
    candidates, _, _ = _complete(["gptcli", "mod"])
    assert candidates == ["models"]


def test_backend_completion_includes_path_backends_and_skips_conflicts(monkeypatch):
    from gptcli.cli.common import complete_backend

    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", "scripted=tests.scripted:ScriptedBackend")
    names = [value for value, _ in complete_backend("")]
    assert names[0] == "torch" and "scripted" in names
    assert [value for value, _ in complete_backend("scr")] == ["scripted"]


def test_template_completion_lists_builtin_templates():
    from gptcli.cli.common import complete_template

    if importlib.util.find_spec("gptcli.templates") is None:
        pytest.skip("templates are not part of this build")
    from gptcli.templates import list_templates

    expected = {t.name for t in list_templates()}
    assert expected, "no built-in templates"
    assert {value for value, _ in complete_template("")} == expected


def test_preset_completion_lists_preset_files(monkeypatch, tmp_path):
    from gptcli.cli import common

    (tmp_path / "tiny.yaml").write_text("{}")
    (tmp_path / "small.yaml").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.setattr(common, "preset_dirs", lambda: [tmp_path])
    assert [v for v, _ in common.complete_preset("")] == ["small", "tiny"]
    assert [v for v, _ in common.complete_preset("t")] == ["tiny"]


def test_backend_list_completion_completes_after_the_last_comma(monkeypatch):
    from gptcli.cli.common import complete_backend_list

    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", "scripted=tests.scripted:ScriptedBackend")
    assert [v for v, _ in complete_backend_list("torch,scr")] == ["torch,scripted"]
    assert "torch" not in {v.split(",")[-1] for v, _ in complete_backend_list("torch,")}
    assert [v for v, _ in complete_backend_list("tor")] == ["torch"]


def test_fish_and_zsh_help_texts_stay_on_their_line_in_a_narrow_terminal():
    """Typer wraps a candidate's help at the terminal width: fish read the wrapped part as a candidate."""
    from tests.conftest import run_cli

    words = "gptcli generate --model "
    fish = {"_GPTCLI_COMPLETE": "complete_fish", "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    for env in (fish, {"_GPTCLI_COMPLETE": "complete_zsh"}):
        result = run_cli(env={**env, "_TYPER_COMPLETE_ARGS": words, "COLUMNS": "40", "TERMINAL_WIDTH": ""})
        assert result.returncode == 0, result.stderr.decode()
        lines = result.stdout.decode().splitlines()
        if env is fish:  # one `value<TAB>help` line per candidate
            assert all("\t" in line for line in lines), lines
            assert lines[0].startswith("smollm2-135m-instruct\t")
        else:  # `_arguments '*: :(("value":"help" ...))'`, a candidate a line
            assert all(line.count('"') == 4 for line in lines), lines


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_device_dtype_and_precision_complete_their_choices():
    """They completed nothing (bash then offered file names)."""
    device, modules, _ = _complete(["gptcli", "generate", "--device", ""])
    assert device == ["auto", "cpu", "cuda"]
    assert not _heavy(modules)
    assert _complete(["gptcli", "chat", "--precision", "in"])[0] == ["int8", "int4"]
    assert _complete(["gptcli", "bench", "--dtype", "b"])[0] == ["bfloat16"]
