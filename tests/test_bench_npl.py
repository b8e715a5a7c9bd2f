"""`gptcli bench --npl`: llama-batched-bench's parallel sequences. Each prefill and each decode step is
ONE batched step over npl sequences (each its own cache); t/s is the aggregate, t/s/seq = t/s / npl."""

from __future__ import annotations

import json

import pytest

from gptcli.bench import report, spec
from gptcli.bench.job import Job
from gptcli.bench.measure import time_micro
from gptcli.bench.runner import add_roofline, micro_record
from gptcli.bench.spec import MicroTest
from gptcli.errors import UsageError
from tests.conftest import run_cli
from tests.test_bench_backends import REGISTRY, BatchedTimedBackend, FakeClock, SteppingScripted, TimedBackend

# --- parsing and names ----------------------------------------------------------------------------------


def test_npl_list_parses_and_defaults_to_the_single_sequence_test():
    assert spec.npl_list(None) == [None]
    assert spec.npl_list("1,2,4,2") == [1, 2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [("0", "--npl: 0 is below 1"), ("-2", "--npl: -2 is below 1"), ("two", "not a whole number"), ("1,,2", "empty")],
)
def test_bad_npl_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message) as info:
        spec.npl_list(text)
    assert info.value.exit_code == 2


def test_each_test_runs_at_every_npl_and_says_so_in_its_name():
    tests = spec.micro_tests([8], [4], [(8, 4)], [0, 16], [1, 2])
    assert [t.name for t in tests] == [
        "pp8 npl1",
        "pp8 npl2",
        "tg4 npl1",
        "tg4 npl2",
        "pp8+tg4 npl1",
        "pp8+tg4 npl2",
        "pp8 npl1 @ d16",
        "pp8 npl2 @ d16",
        "tg4 npl1 @ d16",
        "tg4 npl2 @ d16",
        "pp8+tg4 npl1 @ d16",
        "pp8+tg4 npl2 @ d16",
    ]
    assert MicroTest(8, 4, npl=3).tokens == 3 * 12
    assert MicroTest(8, 4).as_dict() == {"n_prompt": 8, "n_gen": 4, "depth": 0}  # no --npl: unchanged
    assert MicroTest(8, 4, npl=3).as_dict()["npl"] == 3
    job = Job("micro", "m", 1, tests=(MicroTest(8, 4, 16, npl=2),))
    assert Job.from_json(job.to_json()).tests == job.tests


# --- timing: one batched step per call ----------------------------------------------------------------


def test_each_decode_step_is_one_batched_step_over_npl_sequences():
    backend = SteppingScripted([5] * 10, vocab_size=50, context_length=64)
    samples = time_micro(backend, MicroTest(0, 6, npl=3), 2, warmup=False)
    assert len(samples) == 2 and all(s > 0 for s in samples)
    # per repetition: the untimed 1-token prompts (one step of 3), then 6 decode steps of 3 single tokens
    assert backend.steps == [[1, 1, 1]] * 7 * 2
    assert len(backend.released) == 3 * 2  # every sequence's cache, after each repetition
    assert len({id(c) for c in backend.released}) == 6  # each sequence had its own cache


def test_the_prefill_is_one_batched_step_and_the_times_are_the_injected_ones():
    clock = FakeClock()
    backend = BatchedTimedBackend(clock, lambda n, i: 0.001 * n)  # 1 ms per token in the batch
    samples = time_micro(backend, MicroTest(16, 4, npl=4), 3, clock=clock, warmup=False)
    assert samples == pytest.approx([4 * 20 * 0.001] * 3)
    assert backend.steps[0] == [(0, 16)] * 4  # one call prefills all four prompts
    assert backend.steps[1:5] == [[(16 + k, 1)] * 4 for k in range(4)]
    assert backend.calls == []  # forward is never called when the backend can step


def test_depth_is_prefilled_once_per_sequence_and_cut_back_before_each_repetition():
    clock = FakeClock()
    backend = BatchedTimedBackend(clock, lambda n, i: 0.001 * n)
    time_micro(backend, MicroTest(8, 0, depth=32, npl=2), 3, clock=clock, warmup=True)
    assert backend.steps[0] == [(0, 32), (0, 32)]
    assert backend.steps[1:] == [[(32, 8), (32, 8)]] * 4  # warm-up + 3 repetitions, each from depth 32


def test_a_backend_without_step_gets_the_looping_default():
    clock = FakeClock()
    backend = TimedBackend(clock, lambda n, i: 0.01)  # no `step`: batched_step loops over forward
    samples = time_micro(backend, MicroTest(0, 3, npl=2), 1, clock=clock, warmup=False)
    assert samples == pytest.approx([3 * 2 * 0.01])
    assert backend.calls == [(0, 1), (0, 1)] + [(k, 1) for k in (1, 2, 3) for _ in range(2)]


# --- records: aggregate and per sequence ----------------------------------------------------------------


def test_aggregate_is_npl_times_tokens_over_time_and_per_sequence_is_its_npl_th():
    test = MicroTest(0, 10, npl=4)
    record = micro_record({"model": "m"}, test, [0.5, 0.25])
    aggregate = [4 * 10 / 0.5, 4 * 10 / 0.25]
    assert record["tokens_per_s"] == pytest.approx(sum(aggregate) / 2, abs=1e-3)
    assert record["tokens_per_s_per_seq"] == pytest.approx(record["tokens_per_s"] / 4, abs=1e-3)
    assert record["tokens_per_s_per_seq_sd"] == pytest.approx(record["tokens_per_s_sd"] / 4, abs=1e-3)
    assert record["npl"] == 4
    assert "tokens_per_s_per_seq" not in micro_record({"model": "m"}, MicroTest(0, 10), [0.5])


def test_a_batched_decode_floor_reads_the_weights_once_for_npl_tokens():
    from gptcli.bench.roofline import DecodeShape

    shape = DecodeShape(total_params=1000, streamed_params=1000, kv_elements_per_position=10)
    bw = {"bytes_per_s": 1e6, "method": "test"}
    single = {"tokens_per_s": 100.0, "depth": 0, "n_gen": 0}
    batched = {**single, "npl": 4, "tokens_per_s": 400.0}
    add_roofline(single, shape, "fp32", bw)
    add_roofline(batched, shape, "fp32", bw)
    kv = 10 * 1 * 4  # one position (the 1-token prompt), fp32
    assert batched["bytes_per_step"] == single["bytes_per_step"] + 3 * kv
    assert batched["roofline_tokens_per_s"] == pytest.approx(4 * 1e6 / batched["bytes_per_step"], abs=1e-3)
    assert batched["roofline_pct"] == pytest.approx(100 * 400 / batched["roofline_tokens_per_s"], abs=0.01)


# --- the real program ---------------------------------------------------------------------------------------


@pytest.fixture
def env(isolated_home):
    """The scripted backends, and a bandwidth seeded into the cache so no test measures the machine."""
    from gptcli.bench.roofline import device_key

    cache = isolated_home / "cache" / "bench"
    cache.mkdir(parents=True)
    seeded = {"bytes_per_s": 20e9, "method": "seeded", "device": "cpu", "measured_at": "2026-01-01T00:00:00+00:00"}
    (cache / "bandwidth.json").write_text(json.dumps({device_key("cpu"): seeded}))
    return {"GPTCLI_BACKEND_PATHS": REGISTRY, "GPTCLI_TEST_SCRIPT": json.dumps([5] * 400)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--npl", "0"], "error: --npl: 0 is below 1"),
        (["--npl", "-1"], "error: --npl: -1 is below 1"),
        (["--npl", "1,x"], "error: --npl: 'x' in '1,x' is not a whole number"),
    ],
)
def test_bad_npl_exits_2_with_one_line(tiny_models, env, args, message):
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "-b", "scripted", *args, env=env)
    assert result.returncode == 2, result.stderr.decode()
    assert result.stderr.decode().splitlines() == [message, "hint: e.g. --npl 1,2,4,8"]
    assert result.stdout == b""


def test_torch_on_the_tiny_model_reports_aggregate_and_per_sequence_t_s(tiny_models, env):
    args = ["bench", "-m", str(tiny_models["llama"]), "-b", "torch", "-p", "8", "-n", "4", "-r", "2"]
    args += ["--threads", "1", "--device", "cpu", "--npl", "1,2", "--in-process"]
    result = run_cli(*args, "-o", "json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(result.stdout)
    records = doc["results"]
    expected = [("pp8 npl1", 1), ("pp8 npl2", 2), ("tg4 npl1", 1), ("tg4 npl2", 2)]
    assert [(r["test"], r["npl"]) for r in records] == expected
    for r in records:
        tokens = r["npl"] * (r["n_prompt"] + r["n_gen"])
        rates = [tokens / s for s in r["samples_s"]]
        assert r["tokens_per_s"] == pytest.approx(sum(rates) / len(rates), rel=1e-3)
        assert r["tokens_per_s_per_seq"] * r["npl"] == pytest.approx(r["tokens_per_s"], abs=0.01)
    assert any("t/s/seq = t/s / N" in note for note in doc["notes"])
    table = run_cli(*args, "-n", "0", "--npl", "2", env=env, timeout=300)
    assert table.returncode == 0, table.stderr.decode()
    (row,) = report.parse_output("table", table.stdout.decode())
    assert row["test"] == "pp8 npl2"
    aggregate, per_seq = (float(row[k].split(" ± ")[0]) for k in ("t/s", "t/s/seq"))
    assert per_seq * 2 == pytest.approx(aggregate, abs=0.02)


def test_without_npl_the_output_has_no_batched_fields(tiny_models, env):
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "-b", "scripted", "-p", "8", "-n", "0", "-r", "1",
                     "-o", "json", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(result.stdout)
    (record,) = doc["results"]
    assert record["test"] == "pp8" and "npl" not in record and "tokens_per_s_per_seq" not in record
    assert not any("npl" in note for note in doc["notes"])


def test_a_worker_process_runs_the_stepping_backend_batched(tiny_models, env):
    result = run_cli("bench", "-m", str(tiny_models["llama"]), "-b", "stepping,scripted", "-p", "4", "-n", "2",
                     "-r", "1", "--npl", "3", "-o", "jsonl", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(r["backend"], r["test"]) for r in rows] == [
        ("stepping", "pp4 npl3"),
        ("stepping", "tg2 npl3"),
        ("scripted", "pp4 npl3"),
        ("scripted", "tg2 npl3"),
    ]
    assert all(r["isolated"] and r["speedup"] is not None for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onnx", "llamacpp"])
def test_onnx_and_the_llamacpp_plugin_run_batched(tiny_models, env, name):
    """Every backend batches through `batched_step`: its native step, or (the plugin) the loop over forward."""
    from gptcli.backends.base import BackendError, get_backend_class

    try:
        reason = get_backend_class(name).unavailable_reason("cpu")
    except BackendError as exc:
        reason = exc.message
    if reason:
        pytest.skip(f"{name}: {reason}")
    args = ["-b", name, "-p", "8", "-n", "4", "-r", "1", "--threads", "1", "--device", "cpu", "--npl", "1,2"]
    result = run_cli("bench", "-m", str(tiny_models["llama"]), *args, "-o", "json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    records = json.loads(result.stdout)["results"]
    assert [r["test"] for r in records] == ["pp8 npl1", "pp8 npl2", "tg4 npl1", "tg4 npl2"]
    for r in records:
        assert r["backend"] == name and r["tokens_per_s_per_seq"] > 0
        assert r["tokens_per_s_per_seq"] * r["npl"] == pytest.approx(r["tokens_per_s"], abs=0.01)
