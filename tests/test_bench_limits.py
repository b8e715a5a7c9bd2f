"""`gptcli bench` inputs it cannot honour, each a one-line error with its exit code before anything runs
(--npl, -r and test counts past their bounds, a --fail-below that is not a ratio, an --output that is not a
writable file), a failed --output write naming the file, and tests whose KV caches would not fit skipped."""

from __future__ import annotations

import errno
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from gptcli.bench import baseline as base_mod
from gptcli.bench import runner, spec
from gptcli.bench.job import Job
from gptcli.bench.spec import MicroTest
from gptcli.errors import GptcliError, InputError, UsageError
from gptcli.textio import Limit
from tests import test_bench_npl
from tests.conftest import run_cli
from tests.test_bench_backends import SteppingScripted

MiB = 2**20


env = test_bench_npl.env  # the same scripted backends and seeded bandwidth: one definition


def bench(model: Path, *args: str, env: dict[str, str]):
    return run_cli("bench", "-m", str(model), "-b", "scripted", "-p", "8", "-n", "4", "-r", "1", *args, env=env)


# --- bounds on what one run holds ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["257", "1,2,100000000"])
def test_npl_past_the_limit_is_a_usage_error_naming_it(text):
    with pytest.raises(UsageError, match=rf"--npl: \d+ is above {spec.MAX_NPL}$") as info:
        spec.npl_list(text)
    assert info.value.exit_code == 2
    assert spec.npl_list(str(spec.MAX_NPL)) == [256]


def test_repetitions_and_the_number_of_tests_are_bounded():
    spec.check_repetitions(spec.MAX_REPETITIONS)
    for reps, message in ((0, "at least 1, got 0"), (spec.MAX_REPETITIONS + 1, "at most 1000, got 1001")):
        with pytest.raises(UsageError, match=message):
            spec.check_repetitions(reps)
    assert len(spec.micro_tests(list(range(1, 33)), list(range(1, 33)), [], list(range(64)))) == spec.MAX_TESTS
    with pytest.raises(UsageError, match=r"4160 tests .* over the limit of 4096"):
        spec.micro_tests(list(range(1, 65)), [], [], list(range(65)))  # counted before any is built
    with pytest.raises(UsageError, match="over the limit"):
        spec.micro_tests([512], [128], [], list(range(9)), list(range(1, 257)))  # 2 x 9 x 256


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--npl", "257"], "error: --npl: 257 is above 256"),
        (["-r", "1001"], "error: -r/--repetitions must be at most 1000, got 1001"),
        (["-d", ",".join(map(str, range(2049)))], "error: 4098 tests (test sizes x depths x --npl values)"),
    ],
)
def test_bounds_exit_2_before_anything_runs(tiny_models, env, args, message):
    result = bench(tiny_models["llama"], *args, env=env)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.splitlines()[0].startswith(message), err
    assert result.stdout == b"" and "repetition 1/" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "train", "--peak-tflops", "nan"], "error: --peak-tflops must be a positive number, got nan"),
        # Options another mode reads were ignored without a word: latency ran one request at a time, train torch.
        (["--mode", "latency", "--npl", "8"], "error: --npl is for --mode micro, not --mode latency"),
        (["--mode", "latency", "-p", "64"], "error: -p/--n-prompt is for --mode micro, not --mode latency"),
        (
            ["--mode", "train", "-b", "onnx"],
            "error: -b/--backend is for --mode micro or --mode latency, not --mode train",
        ),
        (["--max-tokens", "5"], "error: --max-tokens is for --mode latency, not --mode micro"),
        (["--preset", "tiny"], "error: --preset is for --mode train, not --mode micro"),
    ],
)
def test_an_option_of_another_mode_is_a_usage_error(tiny_models, env, args, message):
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "-r", "1", *args, env=env)
    err = result.stderr.decode()
    assert result.returncode == 2 and err.splitlines()[0] == message, err
    assert result.stdout == b"" and "loading" not in err


def test_a_test_whose_kv_caches_would_not_fit_is_skipped_before_any_is_made(monkeypatch):
    backend = SteppingScripted([5] * 50, vocab_size=50, context_length=64)
    backend.info = replace(backend.info, kv_bytes_per_token=MiB)  # 1 MiB a position
    monkeypatch.setattr(runner, "free_memory_bytes", lambda device: 40 * MiB)  # the caches may take 20 MiB
    tests = (MicroTest(0, 4, npl=2), MicroTest(8, 0, npl=4), MicroTest(8, 0))  # 10, 32 and 8 positions
    records: list[dict] = []
    skipped: list[dict] = []
    job = Job("micro", "m", 1, tests=tests, warmup=False)
    common = {"backend": "stepping", "device": "cpu", "precision": "fp32"}
    runner.run_micro_tests(
        job, backend, common, records, skipped, clock=itertools.count().__next__, notify=lambda _: None
    )
    assert [r["test"] for r in records] == ["tg4 npl2", "pp8"]
    assert skipped == [
        {"test": "pp8 npl4", "reason": "its KV caches (4 x 8 positions) need 32 MiB, over half the 40 MiB free"}
    ]
    assert all(len(step) == 2 for step in backend.steps)  # no step over the four sequences ever ran
    unknown = replace(backend.info, kv_bytes_per_token=0)  # a backend that does not say: nothing to check
    assert runner.kv_shortfall(unknown, MicroTest(8, 0, npl=256)) is None


# --- --fail-below ---------------------------------------------------------------------------------------------


def test_fail_below_is_a_finite_positive_ratio():
    for ratio in (None, 0.01, 0.9, 1, 1.2, base_mod.MAX_FAIL_BELOW):
        base_mod.check_fail_below(ratio)
    for ratio in (float("nan"), float("inf"), float("-inf"), -3, 0, 90):
        with pytest.raises(UsageError, match="--fail-below must be a ratio to the baseline above 0") as info:
            base_mod.check_fail_below(ratio)
        assert info.value.exit_code == 2


@pytest.mark.parametrize("value", ["nan", "-3", "0", "inf", "90"])
def test_a_fail_below_that_could_never_or_always_fail_exits_2(tiny_models, env, tmp_path, value):
    runs = tmp_path / "runs.jsonl"
    saved = {"mode": "micro", "model": "llama", "backend": "scripted", "precision": "fp32", "test": "pp8"}
    runs.write_text(json.dumps({**saved, "threads": 1, "tokens_per_s": 1.0}) + "\n")
    result = bench(tiny_models["llama"], "--baseline", str(runs), "--fail-below", value, env=env)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.splitlines() == [
        f"error: --fail-below must be a ratio to the baseline above 0 and at most 10, got {float(value):g}",
        "hint: e.g. --fail-below 0.9 fails when a result is over 10% slower than the baseline",
    ]
    assert result.stdout == b""


def test_a_baseline_is_read_at_most_to_its_limit(tmp_path, monkeypatch):
    runs = tmp_path / "runs.jsonl"
    record = {"mode": "micro", "model": "m", "backend": "b", "precision": "fp32", "test": "pp8", "threads": 1}
    runs.write_text((json.dumps(record) + "\n") * 100)
    assert len(base_mod.load_records(runs)) == 100
    monkeypatch.setattr(base_mod, "BASELINE_LIMIT", Limit(1024, "a bench baseline", "trim it"))
    with pytest.raises(InputError, match=r"runs.jsonl: over the 1 KiB limit for a bench baseline"):
        base_mod.load_records(runs)
    with pytest.raises(InputError, match="looks like a binary file"):
        base_mod.load_records(Path("/dev/zero"))  # never read to the end


# --- --output ----------------------------------------------------------------------------------------------------


def test_an_output_that_is_a_folder_or_under_a_file_exits_6_before_anything_runs(tiny_models, env, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for output, message in (
        (tmp_path, f"error: --output {tmp_path} is a folder"),
        (a_file / "sub" / "runs.jsonl", f"error: --output {a_file}/sub/runs.jsonl: {a_file} is not a folder"),
        (Path(os.devnull), f"error: --output {os.devnull} is not a regular file"),
    ):
        result = bench(tiny_models["llama"], "--output", str(output), env=env)
        err = result.stderr.decode()
        assert result.returncode == 6, err
        assert err.splitlines()[0] == message
        assert result.stdout == b"" and "repetition 1/" not in err  # checked before the benchmark


def test_an_output_that_is_not_bench_json_lines_is_left_as_it_is(tiny_models, env, tmp_path):
    """--output appended its lines to any file: an -o json document (which --baseline then refused: 'line 1: not
    JSON'), a prompts file."""
    document = tmp_path / "run.json"
    document.write_bytes(bench(tiny_models["llama"], "-o", "json", env=env).stdout)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hi"}\n')
    for output in (document, prompts):
        before = output.read_bytes()
        result = bench(tiny_models["llama"], "--output", str(output), env=env)
        err = result.stderr.decode()
        assert result.returncode == 6 and output.read_bytes() == before, err
        assert err.splitlines()[0].endswith(
            f"{output} does not hold bench results as JSON lines (its first line is not one)"
        )
    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(bench(tiny_models["llama"], "-o", "jsonl", env=env).stdout)  # -o jsonl's lines: appended to
    assert bench(tiny_models["llama"], "--output", str(runs), env=env).returncode == 0
    assert len(base_mod.load_records(runs)) == 2 * len(base_mod.load_records(document))


def test_output_checks_name_an_unwritable_folder_and_an_unreadable_file(tmp_path, monkeypatch):
    new = tmp_path / "results" / "deeper" / "runs.jsonl"
    base_mod.check_output(new)  # missing folders are made when the results are written
    base_mod.check_output(None)
    assert not new.parent.exists()
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(GptcliError) as refused:  # the environment (exit 1), as any output path not ours to write
        base_mod.check_output(new)
    assert refused.value.exit_code == 1
    assert refused.value.message == f"{new}: cannot create a file in {tmp_path} (Permission denied)"
    existing = tmp_path / "runs.jsonl"
    existing.write_text("")
    with pytest.raises(GptcliError) as refused:
        base_mod.check_output(existing)
    assert refused.value.exit_code == 1
    assert refused.value.message == f"{existing}: cannot be read (the results are appended to it)"


def test_a_failed_output_write_is_one_line_naming_the_file(tiny_models, env, tmp_path, capsys, monkeypatch):
    from gptcli.cli.app import run

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs.jsonl"

    def failing_disk(src, dst, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))

    monkeypatch.setattr(os, "replace", failing_disk)
    argv = ["bench", "-m", str(tiny_models["llama"]), "-b", "scripted", "-p", "8", "-n", "0", "-r", "1"]
    assert run([*argv, "--in-process", "--output", str(runs)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"error: cannot append the results to {runs}: Input/output error" in err, err
    assert not any("internal error" in line for line in err)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
