"""`gptcli bench` as a user runs it: the real program in a subprocess, each backend configuration in
its own worker process. The scripted backend keeps these fast; one slow test runs torch (and onnx)."""

from __future__ import annotations

import json

import pytest

from gptcli.bench import report
from tests.conftest import run_cli
from tests.test_bench_backends import REGISTRY
from tests.test_hardening import first_error

BANDWIDTH = 20e9  # seeded into the cache so no test measures the machine


@pytest.fixture
def env(isolated_home):
    from gptcli.bench.roofline import device_key

    cache = isolated_home / "cache" / "bench"
    cache.mkdir(parents=True)
    (cache / "bandwidth.json").write_text(
        json.dumps(
            {
                device_key("cpu"): {
                    "bytes_per_s": BANDWIDTH,
                    "method": "seeded",
                    "device": "cpu",
                    "measured_at": "2026-01-01T00:00:00+00:00",
                }
            }
        )
    )
    return {"GPTCLI_BACKEND_PATHS": REGISTRY, "GPTCLI_TEST_SCRIPT": json.dumps([5] * 400), "GPTCLI_TEST_DELAY": "0.001"}


def bench(model, *args, env, **kw):
    sizes = [] if "--mode" in args else ["-p", "8", "-n", "4"]  # micro tests' sizes: another mode refuses them
    return run_cli("bench", "-m", str(model), *sizes, "-r", "2", *args, env=env, **kw)


def test_json_has_samples_environment_notes_and_the_roofline(tiny_models, env):
    result = bench(tiny_models["llama"], "-b", "scripted", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(result.stdout)
    pp, tg = doc["results"]
    assert (pp["test"], tg["test"]) == ("pp8", "tg4")
    assert len(pp["samples_s"]) == 2 and pp["synthetic_ids"] is True and pp["backend"] == "scripted"
    assert pp["peak_rss_mib"] > 10 and pp["isolated"] is True
    assert "roofline_pct" not in pp
    assert tg["bandwidth_gb_s"] == BANDWIDTH / 1e9
    expected = 100 * tg["tokens_per_s"] / (BANDWIDTH / tg["bytes_per_step"])
    assert tg["roofline_pct"] == pytest.approx(expected, abs=0.006)
    for key in ("cpu", "gptcli", "torch", "onnxruntime", "date", "git_commit"):
        assert key in doc["environment"]
    assert any("synthetic token ids" in note for note in doc["notes"])
    assert "repetition" in result.stderr.decode()  # progress goes to stderr, never stdout


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_each_output_format_parses_back(tiny_models, env, fmt):
    result = bench(tiny_models["llama"], "-b", "scripted,scripted2", "-o", fmt, "--in-process", env=env)
    assert result.returncode == 0, result.stderr.decode()
    rows = report.parse_output(fmt, result.stdout.decode())
    assert [r["test"] for r in rows] == ["pp8", "tg4", "pp8", "tg4"]
    assert [r["backend"].split()[0] for r in rows] == ["scripted", "scripted", "scripted2", "scripted2"]
    assert all(r["speedup"] not in (None, "") for r in rows)


def test_threads_and_backends_form_a_cartesian_product(tiny_models, env):
    result = bench(
        tiny_models["llama"], "-b", "scripted,scripted2", "--threads", "1,2", "-n", "0", "-o", "jsonl", env=env
    )
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(r["backend"], r["threads"]) for r in rows] == [
        ("scripted", 1),
        ("scripted", 2),
        ("scripted2", 1),
        ("scripted2", 2),
    ]


def test_baseline_regression_exits_1_and_a_pass_exits_0(tiny_models, env, tmp_path):
    runs = tmp_path / "runs.jsonl"
    first = bench(tiny_models["llama"], "-b", "scripted", "--output", str(runs), env=env)
    assert first.returncode == 0, first.stderr.decode()
    assert len(runs.read_text().splitlines()) == 2
    slow_env = {**env, "GPTCLI_TEST_DELAY": "0.02"}  # 20x slower forward calls
    slow = bench(tiny_models["llama"], "-b", "scripted", "--baseline", str(runs), "--fail-below", "0.9", env=slow_env)
    assert slow.returncode == 1
    err = slow.stderr.decode().splitlines()
    assert any(line.startswith("error: 2 result(s) fell below 0.9x the baseline") for line in err), err
    rows = report.parse_output("table", slow.stdout.decode())  # the table still comes first
    assert all(float(r["vs baseline"].rstrip("x")) < 0.9 for r in rows)
    ok = bench(tiny_models["llama"], "-b", "scripted", "--baseline", str(runs), "--fail-below", "0.01", env=env)
    assert ok.returncode == 0, ok.stderr.decode()
    other_tests = ["-p", "7", "-n", "3"]  # pp7 and tg3: the baseline holds pp8 and tg4
    other = bench(
        tiny_models["llama"], "-b", "scripted", *other_tests, "--baseline", str(runs), "--fail-below", "1", env=env
    )
    assert other.returncode == 1  # a gate that compared nothing does not pass
    assert "nothing was compared" in other.stderr.decode()


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_output_appends_whole_lines_atomically(tmp_path, monkeypatch, failing):
    """--output goes through append_jsonl: a write that fails half-way (a full disk, a kill before the
    rename) leaves the old file exactly as it was, and no temporary file beside it."""
    import errno
    import os

    from gptcli.bench.baseline import append_jsonl

    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(b'{"a": 1}\n{"b": 2}')  # a last line without its newline gets one
    append_jsonl(runs, ['{"c": 3}', '{"d": 4}'])
    before = runs.read_bytes()
    assert before == b'{"a": 1}\n{"b": 2}\n{"c": 3}\n{"d": 4}\n'

    def disk_full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(OSError, match="No space left"):
        append_jsonl(runs, ['{"e": 5}'] * 1000)
    assert runs.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["runs.jsonl"]


def test_output_appends_without_reading_the_history_whole(tmp_path, monkeypatch):
    """A long `--output` history was read into memory whole (path.read_bytes()) on every append; it is
    copied in pieces now, with the same bytes as the result."""
    from pathlib import Path

    from gptcli.bench.baseline import append_jsonl

    runs = tmp_path / "runs.jsonl"
    history = b"".join(b'{"n": %d}\n' % i for i in range(50_000)) + b'{"last": 1}'  # ~0.6 MB, no final newline
    runs.write_bytes(history)

    def whole(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    append_jsonl(runs, ['{"new": 1}'])
    monkeypatch.undo()
    assert runs.read_bytes() == history + b'\n{"new": 1}\n'


def test_output_is_left_whole_when_the_cli_cannot_finish_writing_it(tiny_models, env, tmp_path, capsys, monkeypatch):
    """`bench --output` itself (in-process): a rename that fails leaves the earlier results as they were."""
    import errno
    import os
    from pathlib import Path

    from gptcli.cli.app import run

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "results" / "runs.jsonl"
    argv = ["bench", "-m", str(tiny_models["llama"]), "-p", "8", "-n", "4", "-r", "2", "-b", "scripted"]
    argv += ["--in-process", "--output", str(runs)]
    assert run(argv) == 0, capsys.readouterr().err
    before = runs.read_bytes()
    assert len(before.splitlines()) == 2
    real_replace = os.replace

    def full_disk_for_runs(src, dst, **kwargs):
        if Path(dst).name == runs.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk_for_runs)
    capsys.readouterr()
    assert run(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert runs.read_bytes() == before
    assert [p.name for p in runs.parent.iterdir()] == [runs.name]


def test_latency_mode_counts_requests_and_tokens(tiny_models, env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe capital of France\n")
    result = run_cli(
        "bench",
        "-m",
        str(tiny_models["llama"]),
        "-b",
        "scripted",
        "--mode",
        "latency",
        "--prompts",
        str(prompts),
        "--max-tokens",
        "3",
        "-r",
        "2",
        "-o",
        "json",
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()
    (record,) = json.loads(result.stdout)["results"]
    assert record["requests"] == 4 and record["samples"]["output_tokens"] == [3, 3, 3, 3]
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(record[metric]) == {"mean", "median", "p90", "p99"}
    assert record["ttft_ms"]["mean"] < record["e2e_ms"]["mean"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-b", "nope"], 4, "error: unknown backend 'nope'"),
        (["-b", "broken"], 4, "error: no backend can run here (broken: needs a quantum accelerator)"),
        (["-p", "1,,2"], 2, "error: -p: bad list '1,,2' (empty item)"),
        (["-r", "0"], 2, "error: -r/--repetitions must be at least 1, got 0"),
        (["--mode", "latency", "-b", "scripted", "--seed", "-1"], 3, "error: --seed: sampling.seed must be in"),
        (["-o", "xml"], 2, "error: -o/--output-format must be one of table, md, csv, json, jsonl, got 'xml'"),
        (["--precision", "int3"], 3, "error: --precision: precision must be one of fp32, fp16, int8, int4"),
        (["--baseline", "missing.jsonl"], 6, "error: baseline file not found: missing.jsonl"),
    ],
)
def test_errors_are_one_line_with_their_exit_codes(tiny_models, env, args, code, message):
    result = bench(tiny_models["llama"], *args, env=env)
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert err.splitlines()[0].startswith(message), err
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("second", "warning", "note"),
    [
        ("broken", "backend 'broken' skipped: needs a quantum accelerator", "backend broken unavailable: needs a"),
        ("refusing", "refusing fp32 skipped: cannot export this model", "backend refusing fp32 unavailable: cannot"),
    ],
)
def test_a_backend_that_cannot_run_or_refuses_the_model_is_listed_and_the_rest_still_run(
    tiny_models, env, second, warning, note
):
    result = bench(tiny_models["llama"], "-b", f"scripted,{second}", "-o", "md", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert f"warning: {warning}" in result.stderr.decode()
    out = result.stdout.decode()
    assert f"note: {note}" in out
    assert len(report.parse_output("md", out)) == 2  # the finished rows are kept (a refusal used to lose them)


def test_a_model_refused_by_the_only_backend_keeps_the_refusals_exit_code(tiny_models, env):
    alone = bench(tiny_models["llama"], "-b", "refusing", env=env)
    assert alone.returncode == 5 and first_error(alone) == (
        "error: cannot export this model: activation relu6 is not supported"
    )


def test_too_deep_tests_are_skipped_with_a_note(tiny_models, env):
    result = bench(tiny_models["llama"], "-b", "scripted", "-d", "60", "-o", "json", env=env)  # context 64
    assert result.returncode == 6 and result.stdout == b""  # nothing ran: say why, not an empty table
    assert first_error(result).startswith("error: no test ran (pp8 @ d60 on scripted: needs 68 positions")
    result = bench(tiny_models["llama"], "-b", "scripted", "-d", "0,60", "-o", "json", env=env)
    doc = json.loads(result.stdout)
    assert [r["test"] for r in doc["results"]] == ["pp8", "tg4"]
    assert [s["test"] for s in doc["skipped"]] == ["pp8 @ d60", "tg4 @ d60"]


@pytest.mark.slow
def test_tiny_models_end_to_end_on_torch_and_onnx(tiny_models, isolated_home):
    """The real backends on the fixture models; onnx joins when its backend is importable here."""
    from gptcli.backends.base import BackendError, get_backend_class

    backends = ["torch"]
    try:
        if get_backend_class("onnx").unavailable_reason("cpu") is None:
            backends.append("onnx")
    except BackendError:
        pass
    for family in ("gpt2", "llama"):
        result = run_cli(
            "bench",
            "-m",
            str(tiny_models[family]),
            "-b",
            ",".join(backends),
            "-p",
            "16",
            "-n",
            "8",
            "-r",
            "2",
            "--threads",
            "1",
            "--device",
            "cpu",
            "--dtype",
            "float32",  # auto is bf16 on a CPU with avx512_bf16
            "-o",
            "json",
            timeout=300,
        )
        assert result.returncode == 0, result.stderr.decode()
        records = json.loads(result.stdout)["results"]
        assert [(r["backend"], r["test"]) for r in records] == [(b, t) for b in backends for t in ("pp16", "tg8")]
        for r in records:
            assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 50 and r["precision"] == "fp32"
        tg = [r for r in records if r["test"] == "tg8"]
        assert all(r["roofline_pct"] > 0 for r in tg)
        if len(backends) > 1:
            assert all(r["speedup"] is not None for r in records)


def test_train_mode_on_the_tiny_preset(env):
    result = run_cli("bench", "--mode", "train", "--preset", "tiny", "-r", "2", "--threads", "1", "-o", "json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    (record,) = json.loads(result.stdout)["results"]
    assert record["mode"] == "train" and record["model"] == "tiny" and record["test"] == "train b4x16"
    assert record["ms_per_iter"] > 0 and record["tokens_per_s"] > 0 and len(record["samples_s"]) == 2
    assert record["peak_rss_mib"] > 50
    bad = run_cli("bench", "--mode", "train", "--preset", "tinyy", env=env)
    assert bad.returncode == 3 and bad.stderr.decode().startswith("error: unknown preset 'tinyy'")


def _slow_bench_under_way(
    tiny_models,
    env,
    backends: str,
    *,
    ignore_ctrl_c: bool = False,
    test: tuple[str, ...] = ("-p", "8", "-n", "2", "-r", "500"),
    under_way: bytes = b"tg2: repetition 3/500",
):
    """`gptcli bench` in a session of its own, returned once pp8 is done and tg2 is under way (or the line
    `under_way` of another `test`). With `ignore_ctrl_c`, started as `cmd &` in a script starts it: SIGINT
    ignored, which its worker inherits."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    args = ["bench", "-m", str(tiny_models["llama"]), "-b", backends, *test, "-o", "jsonl"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env, "GPTCLI_TEST_DELAY": "0.02"},
        cwd=REPO,
        start_new_session=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_ctrl_c else None,
    )
    for line in proc.stderr:
        if under_way in line:
            break
    return proc


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stopped_latency_run_ends_at_once_with_the_requests_that_finished(tiny_models, env, stop):
    """One Ctrl-C (or timeout's SIGTERM, to the whole group) cut only the request it hit, counted it, and ran
    every other one; a SIGTERM that came with the Ctrl-C could print "Signal 15 ignored due to race condition"."""
    import os
    import signal
    import time

    test = ("--mode", "latency", "--max-tokens", "20", "-r", "50")  # 4 prompts x 50: 200 requests, ~80 s
    proc = _slow_bench_under_way(tiny_models, env, "scripted", test=test, under_way=b"latency: request 3/200")
    stopped = time.monotonic()
    os.killpg(proc.pid, getattr(signal, stop))  # the worker gets it, and again from gptcli bench, which passes it on
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143}[stop] and time.monotonic() - stopped < 15, err.decode()
    [row] = [json.loads(line) for line in out.decode().splitlines()]
    reasons = row["samples"]["finish_reasons"]
    assert len(reasons) == 2 and "interrupted" not in reasons, row["samples"]  # the cut one is not counted
    assert "Traceback" not in err.decode() and "race condition" not in err.decode(), err.decode()


def test_the_benchmark_workers_later_stops_are_ignored_without_a_race_warning(monkeypatch):
    """Its first stop set SIG_IGN for the rest: a second signal already on its way then found SIG_IGN, and Python
    printed "OSError: Signal 15 ignored due to race condition" with a traceback (timeout's SIGTERM to the group)."""
    import signal
    import sys
    import threading

    from gptcli.bench import worker

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    both = {signal.SIGINT, signal.SIGTERM}
    before = {kind: signal.getsignal(kind) for kind in both}
    try:
        for kind in both:
            signal.signal(kind, worker._stop_once)
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        main = threading.main_thread().ident  # to this thread, which blocks them: both wait, as if they came at once
        signal.pthread_kill(main, signal.SIGINT)
        signal.pthread_kill(main, signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # both arrive together: the first stops, the second finds _ignore
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            for _ in range(1000):  # the handlers run between bytecodes
                pass
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
        for kind, handler in before.items():
            signal.signal(kind, handler)
    assert not unraisable, [str(u.exc_value) for u in unraisable]


def test_ctrl_c_prints_the_finished_results_and_exits_130(tiny_models, env):
    import os
    import signal

    proc = _slow_bench_under_way(tiny_models, env, "scripted,scripted2")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [(r["backend"], r["test"]) for r in rows] == [("scripted", "pp8")]
    assert len(rows[0]["samples_s"]) == 500
    assert "interrupted" in err.decode()


@pytest.mark.parametrize(
    ("how", "ignore_ctrl_c"),
    [
        ("a kill: only the parent gets it", False),
        ("timeout: the whole process group gets it", False),
        ("a kill of a run started with Ctrl-C ignored (`cmd &` in a script)", True),
    ],
)
def test_sigterm_reaches_the_worker_as_ctrl_c_keeps_the_finished_results_and_exits_143(
    tiny_models, env, how, ignore_ctrl_c
):
    """A SIGTERM to the process group killed the worker with its finished tests (empty stdout); one to the parent
    of a run that ignores Ctrl-C was passed on as a Ctrl-C the worker ignored, and the run went on to its end."""
    import os
    import signal
    import time

    proc = _slow_bench_under_way(tiny_models, env, "scripted", ignore_ctrl_c=ignore_ctrl_c)
    if how.startswith("timeout"):
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err.decode()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["test"] for r in rows] == ["pp8"] and len(rows[0]["samples_s"]) == 500
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the worker stopped too: nothing is left in the session
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the benchmark worker outlived gptcli bench")
