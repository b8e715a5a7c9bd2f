"""scripts/fuzz_cli.py's seeded subset (mutated invocations of every command, in process), and the failures it
found, each as the one invocation that shows it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_script, run_cli

fuzz = load_script("fuzz_cli")


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory) -> Any:
    return fuzz.make_world(tmp_path_factory.mktemp("cli-fuzz"), tiny_models)


def gptcli(world: Any, tmp_path: Path, *argv: str, stdin: bytes = b"", **env: str) -> Any:
    """One invocation in process, as the fuzzer runs it; its oracle must find nothing wrong."""
    scratch = tmp_path / f"run-{len(list(tmp_path.iterdir()))}"
    scratch.mkdir()
    outcome = fuzz.run_case(fuzz.Case(list(argv), stdin=stdin, env=env), world, scratch, timeout=60)
    assert not outcome.problems, outcome
    return outcome


def test_mutated_invocations_exit_with_a_documented_code_and_one_error_line(world):
    """A seeded 40 of scripts/fuzz_cli.py's cases (its --cases N --seed S runs thousands)."""
    failures = fuzz.fuzz_cli(world, cases=40, seed=0)
    assert not failures, "\n".join(str(failure) for failure in failures[:5])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "-f", "{long}"],
        ["summarize", "{long}"],
        ["models", "info", "{long}"],
        ["generate", "--batch", "{prompt}", "-o", "{long}"],
        ["config", "init", "{long}"],
    ],
)
def test_a_path_too_long_to_name_a_file_says_so_not_that_it_cannot_be_written(world, tmp_path, argv):
    long = "y" * 300  # a name over 255 bytes: stat() fails with ENAMETOOLONG, for a read as for a write
    argv = [arg.format(long=long, prompt=world.files["prompt"]) for arg in argv]
    outcome = gptcli(world, tmp_path, *argv)
    # was 'error: cannot write yyy...: File name too long' for the files it reads too
    assert outcome.code == 6 and outcome.stderr.startswith(f"error: {long}: File name too long\n"), outcome.stderr
    assert outcome.stderr.endswith("hint: use a shorter path\n")


def test_a_config_file_that_cannot_be_opened_is_a_config_error_naming_it(world, tmp_path):
    long = "y" * 300
    outcome = gptcli(world, tmp_path, "config", "show", "--config", long)
    assert outcome.code == 3, outcome.stderr  # was exit 6, 'cannot write': is_dir() raised in the error's hint
    assert outcome.stderr.startswith(f"error: cannot read config file {long}: File name too long")


@pytest.mark.parametrize(
    "config, env",
    [
        ("precision: '{huge}'\n", {}),
        ("sampling:\n  presence_penalty: '{huge}'\n", {}),
        ("", {"GPTCLI_DEVICE": "{huge}"}),
        ("", {"GPTCLI_TOP_P": "{huge}"}),
        ("chat_template: '{huge}'\n", {}),
        ("backend: '{huge}'\n", {}),  # 'unknown backend ...' quoted it whole too
        ("", {"GPTCLI_BACKEND": "{huge}"}),
    ],
)
def test_a_huge_value_in_the_config_or_environment_is_quoted_short(world, tmp_path, config, env):
    huge = "x" * 100_000
    scratch = tmp_path / "run"
    scratch.mkdir()
    model = f"model: {world.models['llama']}\n"
    case = fuzz.Case(
        ["generate", "hi", "-n", "1"],
        env={key: value.format(huge=huge) for key, value in env.items()},
        config=(model + config.format(huge=huge)).encode(),
    )
    outcome = fuzz.run_case(case, world, scratch, timeout=60)
    error = outcome.stderr.splitlines()[0]
    assert outcome.code in (3, 4, 6) and error.startswith("error: "), outcome.stderr[:300]
    # was the whole value: an error line of 100,000 characters for a value the command line never showed
    assert len(error) < 1500 and "characters more)" in error, error[:300]


def test_a_name_that_is_not_utf8_on_a_strict_stdout_is_named_as_such(world, tmp_path):
    """`train --data $'corpus\\xff' --dry-run` prints the path; on a stdout that refuses what is not UTF-8 (a UTF-8
    locale such as en_US.UTF-8, or in process) it said 'its encoding (utf-8) cannot hold U+DCFF, use a UTF-8 locale',
    and in process an exception escaped run() (stdout had no descriptor to point at /dev/null). (It was `--out
    $'out\\xff'`, which is now refused before anything is printed: the tokenizers library cannot write there.)"""
    data = tmp_path / os.fsdecode(b"corpus\xff.txt")
    shutil.copyfile(world.files["corpus"], data)
    argv = ["train", "--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "run"), "--dry-run"]
    outcome = gptcli(world, tmp_path, *argv)
    assert outcome.code == 1
    assert outcome.stderr.splitlines()[-2:] == [
        "error: cannot write to stdout: the text holds the byte \\xff, which is not UTF-8 (from a file or folder "
        "name, or an argument)",
        "hint: rename it to UTF-8, or set PYTHONIOENCODING=utf-8:surrogateescape to pass such bytes through",
    ]
    real = run_cli(*argv, env={"PYTHONIOENCODING": "utf-8:strict", "GPTCLI_HOME": str(tmp_path / "home")})
    assert real.returncode == 1 and b"holds the byte \\xff, which is not UTF-8" in real.stderr, real.stderr
