"""bench core: statistics, test specs, micro/latency timing with injected clocks, the roofline
arithmetic, output formats (each parses back), baseline matching and the regression check."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from gptcli.bench import baseline as base_mod
from gptcli.bench import report, spec
from gptcli.bench.measure import time_micro, time_requests
from gptcli.bench.plan import plan_configs
from gptcli.bench.roofline import BYTES_PER_WEIGHT, DecodeShape, decode_shape, percent_of_floor, roofline_tokens_per_s
from gptcli.bench.runner import add_roofline, add_speedups, micro_record
from gptcli.bench.spec import MicroTest
from gptcli.bench.stats import distribution, mean, percentile, sample_sd
from gptcli.config import SamplingConfig
from gptcli.errors import BackendError, InputError, UsageError
from tests.test_bench_backends import REGISTRY, FakeClock, TimedBackend

# --- statistics -------------------------------------------------------------------------------------


def test_mean_and_sample_sd_match_the_statistics_module():
    values = [10.0, 12.0, 9.5, 11.25, 30.0]
    assert mean(values) == pytest.approx(statistics.mean(values))
    assert sample_sd(values) == pytest.approx(statistics.stdev(values))  # n - 1, not n
    assert sample_sd([4.0]) == 0.0


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentiles_match_numpy_linear(q):
    values = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.6, 5.3]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_distribution_of_one_value_is_that_value():
    d = distribution([7.0])
    assert (d.mean, d.median, d.p90, d.p99) == (7.0, 7.0, 7.0, 7.0)


# --- test names and lists ---------------------------------------------------------------------------


def test_llama_bench_names_and_order():
    tests = spec.micro_tests([512], [128], [(512, 128)], [0, 1024])
    assert [t.name for t in tests] == [
        "pp512",
        "tg128",
        "pp512+tg128",
        "pp512 @ d1024",
        "tg128 @ d1024",
        "pp512+tg128 @ d1024",
    ]
    assert MicroTest(0, 128, 1024).context_needed() == 1024 + 1 + 128


@pytest.mark.parametrize("text", ["1,,2", "1,", ",1", ""])
def test_bad_list_syntax_is_a_usage_error(text):
    with pytest.raises(UsageError) as info:
        spec.int_list(text, "-p")
    assert info.value.exit_code == 2 and "empty item" in info.value.message


def test_a_word_in_a_list_is_quoted_once_and_short():
    """`-n abc` said "'abc' in 'abc'", and a 5,000-character value made a 10 KB error line."""
    with pytest.raises(UsageError) as info:
        spec.int_list("abc", "-n")
    assert info.value.message == "-n: 'abc' is not a whole number"
    with pytest.raises(UsageError) as info:
        spec.pair("x" * 5000, "--pg")
    assert len(info.value.message) < 300 and info.value.hint == "e.g. --pg 512,128"
    with pytest.raises(UsageError, match="'two' in '1,two' is not"):
        spec.int_list("1,two", "-p")


def test_lists_reject_words_and_negatives_and_zero_sizes():
    with pytest.raises(UsageError, match="not a whole number"):
        spec.int_list("1,two", "-p")
    with pytest.raises(UsageError, match="below 1"):
        spec.int_list("0", "--threads", minimum=1)
    with pytest.raises(UsageError, match="nothing to benchmark"):
        spec.micro_tests([0], [0], [], [0])
    with pytest.raises(UsageError, match="PROMPT,GEN"):
        spec.pair("512", "--pg")
    assert spec.pair("512,128", "--pg") == (512, 128)


# --- micro timing with injected costs -------------------------------------------------------------------


def test_pp_samples_are_the_injected_prefill_times():
    clock = FakeClock()
    durations = [0.5, 1.0, 0.25]
    backend = TimedBackend(clock, lambda n, i: durations[i])
    samples = time_micro(backend, MicroTest(64, 0), 3, clock=clock, warmup=False)
    assert samples == durations
    record = micro_record({"model": "m"}, MicroTest(64, 0), samples)
    rates = [64 / d for d in durations]
    assert record["tokens_per_s"] == pytest.approx(statistics.mean(rates), abs=1e-3)
    assert record["tokens_per_s_sd"] == pytest.approx(statistics.stdev(rates), abs=1e-3)
    assert record["synthetic_ids"] is True


def test_a_long_prompt_is_read_512_tokens_a_call_alone_and_in_a_batch():
    """`-p 100000` was one call: its attention grew to 10 GB, then 'internal error: ... allocate 40000000000 bytes'."""
    from tests.test_bench_backends import BatchedTimedBackend

    clock = FakeClock()
    alone = TimedBackend(clock, lambda n, i: 0.001)
    time_micro(alone, MicroTest(1200, 0, depth=600), 1, clock=clock, warmup=False)
    assert alone.calls == [(0, 512), (512, 88), (600, 512), (1112, 512), (1624, 176)]
    batched = BatchedTimedBackend(clock, lambda n, i: 0.001)
    time_micro(batched, MicroTest(1200, 0, npl=2), 1, clock=clock, warmup=False)
    assert [[fed for _, fed in step] for step in batched.steps] == [[512, 512], [512, 512], [176, 176]]


def test_tg_times_only_the_decode_steps_after_an_untimed_one_token_prompt():
    clock = FakeClock()
    backend = TimedBackend(clock, lambda n, i: 1.0 if n > 1 or i % 9 == 0 else 0.01)  # 1-token prompt costs 1 s
    samples = time_micro(backend, MicroTest(0, 8), 2, clock=clock, warmup=False)
    assert samples == pytest.approx([0.08, 0.08])
    assert backend.calls[:3] == [(0, 1), (1, 1), (2, 1)]  # prompt of one token, then single-token steps


def test_depth_is_prefilled_once_and_each_repetition_starts_at_that_depth():
    clock = FakeClock()
    backend = TimedBackend(clock, lambda n, i: 0.001 * n)
    samples = time_micro(backend, MicroTest(16, 4, depth=100), 3, clock=clock, warmup=True)
    assert backend.calls[0] == (0, 100)
    timed_prefills = [c for c in backend.calls[1:] if c[1] == 16]
    assert [c[0] for c in timed_prefills] == [100] * 4  # warm-up + 3 reps, each from depth 100
    assert samples == pytest.approx([0.02, 0.02, 0.02])  # 16 + 4 tokens at 1 ms each


# --- latency with injected costs ------------------------------------------------------------------------


def test_latency_metrics_from_injected_prefill_and_step_times(tiny_models):
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_models["gpt2"])
    clock = FakeClock()
    token = tokenizer.encode("Paris", add_special_tokens=False)[0]
    backend = TimedBackend(clock, lambda n, i: 0.1 if n > 1 else 0.02, vocab=tokenizer.vocab_size, token=token)
    sampling = SamplingConfig(temperature=0.0, max_tokens=5, seed=0)
    samples = time_requests(backend, tokenizer, ["Once upon a time", "The capital of France"], sampling, 2, clock=clock)
    summary = samples.summary()
    assert summary["requests"] == 4 and summary["output_tokens"] == 20
    assert summary["ttft_ms"]["mean"] == pytest.approx(100.0)
    assert summary["itl_ms"]["p99"] == pytest.approx(20.0)
    assert summary["tpot_ms"]["median"] == pytest.approx(20.0)
    assert summary["e2e_ms"]["mean"] == pytest.approx(100.0 + 4 * 20.0)
    assert len(summary["samples"]["itl_ms"]) == 4 * 4


def test_a_latency_prompt_over_the_context_is_timed_by_its_end_and_said_so_once(tiny_models):
    """It was shortened silently: the table timed a prompt the user never wrote out."""
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(tiny_models["gpt2"])
    clock = FakeClock()
    backend = TimedBackend(clock, lambda n, i: 0.01, vocab=tokenizer.vocab_size, token=5)
    long = "word " * (2 * backend.info.context_length)
    said: list[str] = []
    sampling = SamplingConfig(temperature=0.0, max_tokens=2, seed=0)
    samples = time_requests(backend, tokenizer, ["short", long], sampling, 3, clock=clock, notify=said.append)
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 1 and "kept its last" in warnings[0] and warnings[0].endswith("(prompt 2)")
    assert max(samples.prompt_tokens) < backend.info.context_length


# --- the roofline -----------------------------------------------------------------------------------------


def test_roofline_arithmetic_on_a_known_byte_count():
    shape = DecodeShape(total_params=1_000_000, streamed_params=900_000, kv_elements_per_position=1000)
    step = shape.step_bytes("fp32", context=100)
    assert step == 900_000 * 4 + 1000 * 100 * 4
    assert shape.step_bytes("int8", 0) == 900_000
    assert shape.step_bytes("int4", 0) == 900_000 * BYTES_PER_WEIGHT["int4"]
    # a llama.cpp plugin's GGUF label: Q4_1 packs 32 weights in 20 bytes, with an f16 KV cache
    assert shape.step_bytes("Q4_1", context=10) == 900_000 * 20 / 32 + 1000 * 10 * 2
    bandwidth = 4.0e9  # 4 GB/s
    assert roofline_tokens_per_s(step, bandwidth) == pytest.approx(1000.0)
    assert percent_of_floor(250.0, step, bandwidth) == pytest.approx(25.0)
    record = {"tokens_per_s": 500.0, "depth": 99, "n_gen": 0}
    add_roofline(record, shape, "fp32", {"bytes_per_s": bandwidth, "method": "test"})
    assert record["bytes_per_step"] == step and record["roofline_pct"] == pytest.approx(50.0)


def test_decode_shape_counts_tied_heads_and_skips_position_embeddings(tiny_models):
    from transformers import AutoConfig

    gpt2 = decode_shape(tiny_models["gpt2"])  # tied: the wte matrix is read as the output head
    cfg = AutoConfig.from_pretrained(tiny_models["gpt2"])
    assert gpt2.streamed_params == gpt2.total_params - cfg.n_positions * cfg.n_embd
    assert gpt2.kv_elements_per_position == 2 * cfg.n_layer * cfg.n_embd
    llama = decode_shape(tiny_models["llama"])
    assert llama.streamed_params == llama.total_params
    assert llama.kv_elements_per_position == 2 * 2 * 2 * (64 // 4)  # K+V, layers, kv heads, head dim


def test_decode_shape_skips_the_input_embedding_when_the_head_is_untied(tmp_path):
    from safetensors.numpy import save_file

    save_file(
        {
            "model.embed_tokens.weight": np.zeros((100, 8), np.float32),
            "model.layers.0.mlp.weight": np.zeros((8, 8), np.float32),
            "lm_head.weight": np.zeros((100, 8), np.float32),
        },
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8})
    )
    shape = decode_shape(tmp_path)
    assert shape.total_params == 1664 and shape.streamed_params == 864


# --- formats --------------------------------------------------------------------------------------------------


def sample_records(second_backend: bool = True) -> list[dict]:
    common = {
        "model": "tiny",
        "size_bytes": 4_000_000,
        "params": 1_000_000,
        "device": "cpu",
        "dtype": "float32",
        "threads": 2,
        "peak_rss_mib": 300.0,
        "gpu_peak_mib": None,
    }
    shape = DecodeShape(1_000_000, 1_000_000, 100)
    records = []
    for backend, seconds in [("torch", [0.5, 0.4]), ("onnx", [0.25, 0.2])][: 2 if second_backend else 1]:
        c = {**common, "backend": backend, "precision": "fp32"}
        records.append(micro_record(c, MicroTest(64, 0), seconds))
        tg = micro_record(c, MicroTest(0, 16), [s / 2 for s in seconds])
        add_roofline(tg, shape, "fp32", {"bytes_per_s": 10e9, "method": "test"})
        records.append(tg)
    add_speedups(records)
    return records


def test_speedup_is_against_the_first_backend_for_the_same_test():
    records = sample_records()
    assert [r["speedup"] for r in records] == pytest.approx([1.0, 1.0, 2.0, 2.0], abs=0.01)
    single = sample_records(second_backend=False)
    assert all("speedup" not in r for r in single)


@pytest.mark.parametrize("fmt", report.FORMATS)
def test_every_format_parses_back(fmt):
    records = sample_records()
    env = {"cpu": "test cpu", "torch": "2.x"}
    text = report.render(fmt, records, environment=env, notes=["synthetic token ids"])
    rows = report.parse_output(fmt, text)
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        if fmt in ("json", "jsonl"):
            assert row["tokens_per_s"] == record["tokens_per_s"] and row["samples_s"] == record["samples_s"]
        elif fmt == "csv":
            assert float(row["tokens_per_s"]) == record["tokens_per_s"]
            assert [float(v) for v in row["samples_s"].split()] == record["samples_s"]
        else:
            assert row["test"] == record["test"]
            assert row["t/s"] == f"{record['tokens_per_s']:.2f} ± {record['tokens_per_s_sd']:.2f}"
            assert row["backend"] == f"{record['backend']} cpu fp32"
            assert row["speedup"] == f"{record['speedup']:.2f}x"
    if fmt == "json":
        assert json.loads(text)["environment"]["cpu"] == "test cpu"
    if fmt in ("table", "md"):
        assert text.rstrip().endswith("note: synthetic token ids")


def test_latency_and_train_tables_parse_back():
    lat = {
        "mode": "latency",
        "model": "m",
        "backend": "torch",
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "requests": 4,
        "test": "latency",
        "peak_rss_mib": 10.0,
    }
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        lat[key] = {"mean": 1.0, "median": 1.0, "p90": 2.0, "p99": 3.0}
    rows = report.parse_output("md", report.render("md", [lat], environment={}, notes=[]))
    assert [r["metric"] for r in rows] == ["TTFT", "TPOT", "ITL", "E2E"] and rows[0]["p99 ms"] == "3.00"
    train = {
        "mode": "train",
        "model": "p",
        "params": 10,
        "backend": "torch",
        "device": "cpu",
        "precision": "fp32",
        "threads": 1,
        "test": "train b4x64",
        "ms_per_iter": 12.5,
        "ms_per_iter_sd": 0.5,
        "tokens_per_s": 20480.0,
        "mfu_pct": 1.5,
        "peak_tflops": 1.0,
        "peak_source": "--peak-tflops",
    }
    rows = report.parse_output("table", report.render("table", [train], environment={}, notes=[]))
    assert rows[0]["ms/iter"] == "12.5 ± 0.5" and rows[0]["MFU"] == "1.50%"
    rows = report.parse_output("table", report.render("table", [{**train, "reps": 1}], environment={}, notes=[]))
    assert rows[0]["ms/iter"] == "12.5"  # one repetition has no spread: no "± 0.0"


def test_one_repetition_shows_no_spread_and_says_so():
    from gptcli.bench.runner import notes_for
    from gptcli.bench.stats import mean_sd_text

    assert mean_sd_text(135.28, 0.0, reps=1) == "135.28" and mean_sd_text(135.28, 1.5, reps=3) == "135.28 ± 1.50"
    run = type("Run", (), {"records": [], "skipped": [], "unavailable": []})()
    assert "t/s is one repetition (no spread) after a warm-up" in notes_for("micro", 1, run, in_process=False)
    assert any("mean ± sample standard deviation over 5" in n for n in notes_for("micro", 5, run, in_process=False))


# --- baseline ---------------------------------------------------------------------------------------------------


def test_baseline_matches_by_key_and_flags_regressions(tmp_path):
    saved = sample_records()
    path = tmp_path / "runs.jsonl"
    base_mod.append_jsonl(path, report.jsonl_lines(saved, {"cpu": "x"}))
    base_mod.append_jsonl(path, report.jsonl_lines(saved, {"cpu": "x"}))  # appended twice: the latest wins
    assert len(path.read_text().splitlines()) == 8
    now = sample_records()
    now[2]["tokens_per_s"] = saved[2]["tokens_per_s"] * 0.8  # onnx pp64 got slower
    now[3]["threads"] = 4  # no baseline at 4 threads
    base_mod.compare(now, base_mod.load_records(path))
    assert now[0]["baseline"]["ratio"] == pytest.approx(1.0)
    assert now[2]["baseline"]["ratio"] == pytest.approx(0.8, abs=0.001)
    assert now[3]["baseline"] is None
    assert base_mod.regressions(now, 0.9) == [now[2]]
    assert base_mod.regressions(now, 0.5) == []
    table = report.parse_output("table", report.render("table", now, environment={}, notes=[]))
    assert [r["vs baseline"] for r in table] == ["1.00x", "1.00x", "0.80x", "n/a"]


def test_a_latency_run_matches_a_baseline_of_the_same_workload_only(tmp_path):
    """Latency's test is "latency" whatever --max-tokens and the prompts: a run with -n 16 compared with one
    saved at -n 8 was a 0.53x regression (exit 1 under --fail-below), and one with -n 8 against -n 16 passed."""

    def latency(e2e, max_tokens=8, prompt_tokens=104, requests=3):
        key = {"model": "m", "backend": "torch", "precision": "bf16", "test": "latency", "threads": 1}
        shape = {"max_tokens": max_tokens, "prompt_tokens": prompt_tokens, "requests": requests}
        return {"mode": "latency", **key, **shape, "e2e_ms": {"mean": e2e}}

    path = tmp_path / "runs.jsonl"
    base_mod.append_jsonl(path, [json.dumps(latency(130.0))])
    saved = base_mod.load_records(path)
    longer, prompts, same, more_reps = (
        latency(250.0, 16),
        latency(300.0, 8, 900),
        latency(140.0),
        latency(140.0, 8, 208, 6),
    )
    base_mod.compare([longer, prompts, same, more_reps], saved)
    assert longer["baseline"] is None and prompts["baseline"] is None  # another workload: nothing to compare
    assert same["baseline"]["ratio"] == pytest.approx(130 / 140, abs=0.001)
    assert more_reps["baseline"]["ratio"] == same["baseline"]["ratio"]  # -r 2 over the same prompts: the same test


def test_baseline_reads_a_json_document_and_rejects_junk(tmp_path):
    doc = tmp_path / "run.json"
    doc.write_text(report.render("json", sample_records(), environment={}, notes=[]))
    assert len(base_mod.load_records(doc)) == 4
    junk = tmp_path / "junk.txt"
    junk.write_text("not json\n")
    with pytest.raises(InputError, match="not JSON"):
        base_mod.load_records(junk)
    junk.write_text("[" * 100_000 + "\n")  # was: RecursionError, an internal error
    with pytest.raises(InputError, match=r"junk\.txt:1: not JSON"):
        base_mod.load_records(junk)
    with pytest.raises(InputError, match="not found"):
        base_mod.load_records(tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test": ["tg4"]}, "'test' must be a plain value"),  # was: TypeError, unhashable type: 'list'
        ({"threads": {"n": 1}}, "'threads' must be a plain value"),
        ({"tokens_per_s": "fast"}, "'tokens_per_s' must be a number"),  # was: TypeError in the ratio
        ({"tokens_per_s": -5.0}, "'tokens_per_s' must be a number"),  # was: a regression at -2.00x
        ({"tokens_per_s": float("nan")}, "'tokens_per_s' must be a number"),  # was: a gate that always passed
        ({"mode": "latency", "e2e_ms": 5}, "'e2e_ms' must be a mapping"),  # was: AttributeError
        ({"mode": "latency", "e2e_ms": {"mean": "x"}}, "'e2e_ms.mean' must be a number"),
    ],
)
def test_a_baseline_result_of_the_wrong_types_is_refused_before_the_run(tmp_path, change, message):
    """A hand-edited baseline used to pass load_records and crash in compare, after the whole run."""
    path = tmp_path / "runs.jsonl"
    good = report.jsonl_lines(sample_records(), {"cpu": "x"})
    bad = json.dumps({**json.loads(good[1]), **change})
    path.write_text("\n".join([good[0], bad]) + "\n")
    with pytest.raises(InputError, match=rf"runs\.jsonl: result 2: {message}"):
        base_mod.load_records(path)
    path.write_text(good[0] + "\n" + json.dumps({**json.loads(good[1]), "tokens_per_s": None}) + "\n")
    assert len(base_mod.load_records(path)) == 2  # a result without its number is kept (it compares with nothing)


# --- planning -----------------------------------------------------------------------------------------------------


def test_plan_lists_unavailable_backends_and_fails_when_none_is_left(monkeypatch):
    monkeypatch.setenv("GPTCLI_BACKEND_PATHS", REGISTRY)
    plan = plan_configs(["scripted", "broken"], ["fp32", "int8"], [1, 2], "cpu")
    # scripted ignores --precision, so it runs once per thread count
    assert [(c.backend, c.precision, c.threads) for c in plan.configs] == [
        ("scripted", "fp32", 1),
        ("scripted", "fp32", 2),
    ]
    assert plan.unavailable == [("broken", "needs a quantum accelerator")]
    with pytest.raises(BackendError, match="quantum") as info:
        plan_configs(["broken"], ["fp32"], [1], "cpu")
    assert info.value.exit_code == 4
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        plan_configs(["scripted", "nope"], ["fp32"], [1], "cpu")


def test_bandwidth_is_cached_until_remeasured(monkeypatch, isolated_home):
    from gptcli.bench import roofline

    calls = []
    monkeypatch.setattr(roofline, "measure_cpu_bandwidth", lambda: calls.append(1) or (5e9, "fake"))
    first = roofline.bandwidth("cpu")
    second = roofline.bandwidth("cpu")
    assert (first["cached"], second["cached"], len(calls)) == (False, True, 1)
    assert roofline.bandwidth("cpu", remeasure=True)["cached"] is False and len(calls) == 2
    assert Path(roofline.bandwidth_cache_file()).is_relative_to(isolated_home)


def test_a_bandwidth_that_cannot_be_cached_still_serves_this_run(monkeypatch):
    """A full disk under GPTCLI_HOME said 'warning: cannot measure memory bandwidth on cpu: OSError: [Errno 28] ...'
    and dropped the roofline column, though the bandwidth had just been measured."""
    import errno

    from gptcli.bench import roofline

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(roofline, "measure_cpu_bandwidth", lambda: (5e9, "fake"))
    monkeypatch.setattr(roofline, "write_json_atomic", full)
    notes: list[str] = []
    measured = roofline.bandwidth("cpu", notify=notes.append)
    assert (measured["bytes_per_s"], measured["cached"]) == (5e9, False)
    assert notes[-1] == (
        f"warning: cannot cache the memory bandwidth in {roofline.bandwidth_cache_file()}: No space left on device "
        "(measured again next time)"
    )


# --- train mode ---------------------------------------------------------------------------------------------------


def test_train_mode_arithmetic_with_an_injected_clock():
    from gptcli.bench.job import Job
    from gptcli.bench.train import run_train_job, train_config
    from gptcli.config import Settings

    cfg = train_config("tiny", None)
    ticks = iter(range(10_000))

    def clock() -> float:  # every iteration reads the clock twice: each one takes exactly 0.25 s
        return next(ticks) * 0.25

    job = Job("train", "tiny", 3, Settings(threads=1, device="cpu"), train_config=cfg.to_dict(), peak_tflops=0.001)
    (record,) = run_train_job(job, notify=lambda _: None, clock=clock)["records"]
    tokens = 4 * 16  # batch 4 × block 16
    assert record["test"] == "train b4x16" and record["tokens_per_iter"] == tokens
    assert record["ms_per_iter"] == 250.0 and record["ms_per_iter_sd"] == 0.0
    assert record["tokens_per_s"] == tokens / 0.25
    params = record["params"]
    flops = (6 * params + 12 * 1 * 32 * 16) * tokens  # nanoGPT's estimate: 6N + 12·L·H·T per token
    assert record["flops_per_iter"] == flops
    assert record["mfu_pct"] == pytest.approx(100 * flops / 0.25 / 1e9, rel=1e-3)
    assert record["peak_source"] == "--peak-tflops"


def test_peak_flops_table_and_cpu_estimate():
    from gptcli.hardware import peak_tflops_for

    assert peak_tflops_for("cuda", "NVIDIA H100 80GB HBM3", 1, half=True) == (989.0, "H100 dense 16-bit")
    assert peak_tflops_for("cuda", "NVIDIA A100-SXM4-40GB", 1, half=False)[0] == 19.5
    assert peak_tflops_for("cuda", "Mystery GPU", 1, half=True)[0] is None
    peak, source = peak_tflops_for("cpu", "", 2, half=False)
    assert peak is None or (peak > 0 and source.startswith("est. 2 cores"))


# --- progress -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "runs_at"), [("auto", "bf16"), ("float32", "fp32"), ("bfloat16", "bf16")])
def test_progress_names_the_precision_the_row_names(tiny_models, monkeypatch, requested, runs_at):
    """torch's --precision fp32 runs the weights at --dtype (auto: bf16 on an AVX-512 BF16 CPU): no progress
    line may name another precision than the result row does."""
    from gptcli import hardware
    from gptcli.bench.job import Job
    from gptcli.bench.runner import run_plan
    from gptcli.config import Settings
    from tests.test_hardware import AVX512_BF16

    monkeypatch.setattr(hardware, "cpu_isa", lambda: AVX512_BF16)
    folder = str(tiny_models["llama"])
    settings = Settings(model=folder, device="cpu", dtype=requested, threads=1)
    job = Job("micro", "tiny", 1, settings, model_path=folder, tests=(MicroTest(8, 0),), warmup=False)
    lines: list[str] = []
    run = run_plan(plan_configs(["torch"], ["fp32"], [1], "cpu"), job, isolate=False, notify=lines.append)
    (record,) = run.records
    assert record["precision"] == runs_at
    named = {word for line in lines for word in line.replace(":", " ").split() if word in {"fp32", "bf16", "fp16"}}
    assert named == {runs_at}, lines
    assert "loaded torch cpu " + runs_at in lines and "torch cpu " + runs_at + ": pp8" in lines


def test_train_mode_counts_a_char_model_with_its_unknown_token():
    """QA: `bench --mode train` built a 65-token char model where a shakespeare-char run has 66 (its <unk>)."""
    from gptcli.bench.train import CHAR_VOCAB, build_model
    from gptcli.train.config import load_config
    from gptcli.train.vocab import char_tokenizer

    shakespeare_chars = "\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"
    assert char_tokenizer(shakespeare_chars).get_vocab_size() == CHAR_VOCAB
    _, vocab = build_model(load_config(preset="shakespeare-char"), notify=lambda _: None)
    assert vocab == CHAR_VOCAB
