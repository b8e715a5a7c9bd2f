"""Run a benchmark: each configuration of the plan as one job (load once, run every test), each job
in its own child process (gptcli.bench.worker) unless asked otherwise; then the speedups between them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gptcli.backends.base import chosen_name
from gptcli.bench.isolation import run_isolated
from gptcli.bench.job import Job
from gptcli.bench.measure import peak_memory, time_micro, time_requests
from gptcli.bench.plan import Plan
from gptcli.bench.report import config_label
from gptcli.bench.roofline import (
    DecodeShape,
    bandwidth,
    decode_shape,
    known_precision,
    percent_of_floor,
    roofline_tokens_per_s,
)
from gptcli.bench.spec import MicroTest
from gptcli.bench.stats import mean, sample_sd, spread_words
from gptcli.errors import BackendError, GptcliError
from gptcli.hardware import free_memory_bytes
from gptcli.textio import human_bytes

Notify = Callable[[str], None]
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
SYNTHETIC_NOTE = (
    "micro tests feed synthetic token ids straight to backend.forward: tokenization and sampling are not timed"
)
NPL_NOTE = (
    "nplN: N sequences, each with its own cache, every prefill chunk (512 tokens) and decode step ONE batched step "
    "over all N (a loop over forward where the backend has no native step); t/s is the aggregate over the N sequences "
    "(N x tokens / time), t/s/seq = t/s / N"
)

# A test runs only when its KV caches fit in this share of the free memory; the rest is for the
# activations of its batched steps (a prefill of --npl N prompts is steps of N x 512 tokens).
KV_MEMORY_SHARE = 0.5


def _quiet(_: str) -> None:
    pass


# --- one job: load once, run every test ------------------------------------------------------------


def run_job(job: Job, *, notify: Notify = _quiet, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Load the backend of one configuration and run the job's tests; returns records (JSON-ready)."""
    from gptcli.runtime import check_backend, load_backend

    if job.mode == "train":
        if job.prepare_only:
            return {"records": [], "skipped": []}
        from gptcli.bench.train import run_train_job

        return run_train_job(job, notify=notify, clock=clock)
    settings = job.settings
    backend_cls = check_backend(settings)
    folder = Path(str(job.model_path))
    if job.prepare_only:
        # One-time work (an ONNX export, a conversion) happens here, in a throwaway process, so the
        # measured process's peak memory is what every later run costs.
        load_backend(backend_cls, settings, folder, notify)
        return {"records": [], "skipped": []}
    # What the weights run at is known once the backend has loaded (torch: --precision fp32 runs them at
    # --dtype, which auto resolves per CPU; onnx: an export folder's own), so no line before says it.
    notify(f"loading {settings.backend} ({settings.threads} threads)")
    backend = load_backend(backend_cls, settings, folder, notify)
    info = backend.info
    precision = weights_precision(backend, settings.precision, job.honours_precision)
    shape = _decode_shape_or_none(folder)
    weights_bytes = getattr(backend, "weights_bytes", None)
    if weights_bytes is None and shape is not None and known_precision(precision):
        weights_bytes = int(shape.weight_bytes(precision))
    common = {
        "model": job.model_name,
        "size_bytes": weights_bytes,
        "params": info.params,
        "backend": chosen_name(backend_cls),
        "device": info.device,
        "precision": precision,
        "dtype": info.dtype,
        "threads": settings.threads,
    }
    notify(f"loaded {config_label(common)}")
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    interrupted = False
    try:
        if job.mode == "micro":
            run_micro_tests(job, backend, common, records, skipped, clock=clock, notify=notify)
        else:
            run_latency(job, backend, folder, common, records, clock=clock, notify=notify)
    except KeyboardInterrupt:  # keep what finished; the parent prints it
        interrupted = True
    memory = peak_memory()
    for record in records:
        record.update(memory)
        record["isolated"] = job.isolated
    decode = [r for r in records if r["mode"] == "micro" and r["n_prompt"] == 0]
    if decode and shape is not None and known_precision(precision):
        # Measured last, so its buffer never counts in the peak memory above.
        try:
            bw = None if interrupted else bandwidth(info.device, remeasure=job.remeasure, notify=notify)
        except KeyboardInterrupt:
            interrupted, bw = True, None
        except Exception as exc:  # no roofline is better than no benchmark
            notify(f"warning: cannot measure memory bandwidth on {info.device}: {type(exc).__name__}: {exc}")
            bw = None
        for record in decode if bw else []:
            add_roofline(record, shape, precision, bw)
    return {"records": records, "skipped": skipped, "interrupted": interrupted}


def weights_precision(backend: Any, requested: str, honours: bool) -> str:
    """What a loaded backend's weights run at, as every row and progress line names it: its own word where
    it says (torch: the dtype --precision fp32 resolved to), else the precision asked for, or its dtype."""
    dtype = backend.info.dtype
    return getattr(backend, "precision", None) or (requested if honours else DTYPE_PRECISION.get(dtype, dtype))


def run_micro_tests(
    job: Job,
    backend: Any,
    common: dict[str, Any],
    records: list[dict[str, Any]],
    skipped: list[dict[str, str]],
    *,
    clock: Callable[[], float],
    notify: Notify,
) -> None:
    """Each test in turn; a result lands in `records` as soon as it is complete."""
    context = backend.info.context_length
    for test in job.tests:
        needed = test.context_needed()
        if needed > context:
            skipped.append({"test": test.name, "reason": f"needs {needed} positions; the context holds {context}"})
            continue
        shortfall = kv_shortfall(backend.info, test)
        if shortfall is not None:
            skipped.append({"test": test.name, "reason": shortfall})
            continue
        notify(f"{config_label(common)}: {test.name}")
        samples = time_micro(backend, test, job.reps, clock=clock, warmup=job.warmup, notify=notify)
        records.append(micro_record(common, test, samples))


def kv_shortfall(info: Any, test: MicroTest) -> str | None:
    """Why `test` cannot run here: the KV caches of its sequences, each at its full length, need more than
    KV_MEMORY_SHARE of the free memory; None when they fit, or when the backend or system does not say."""
    per_position = getattr(info, "kv_bytes_per_token", 0) or 0
    free = free_memory_bytes(info.device) if per_position > 0 else None
    if not free:
        return None
    sequences, length = test.sequences, test.context_needed()
    kv_bytes = sequences * length * per_position
    if kv_bytes <= KV_MEMORY_SHARE * free:
        return None
    need, have = human_bytes(kv_bytes), human_bytes(free)
    return f"its KV caches ({sequences} x {length} positions) need {need}, over half the {have} free"


def run_latency(
    job: Job,
    backend: Any,
    folder: Path,
    common: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    clock: Callable[[], float],
    notify: Notify,
) -> None:
    """The latency record of the requests that finished (KeyboardInterrupt after it when Ctrl-C cut the run)."""
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    sampling = job.sampling
    samples = time_requests(
        backend, tokenizer, list(job.prompts), sampling, job.reps, clock=clock, notify=notify, warmup=job.warmup
    )
    if samples.e2e:
        summary = {"test": "latency", "max_tokens": sampling.max_tokens, "reps": job.reps, **samples.summary()}
        records.append({"mode": "latency", **common, **summary})
    if samples.interrupted:
        raise KeyboardInterrupt


def _decode_shape_or_none(folder: Path) -> DecodeShape | None:
    try:
        shape = decode_shape(folder)
    except (GptcliError, OSError, ValueError, KeyError):
        return None
    return shape if shape.streamed_params > 0 else None


def micro_record(common: dict[str, Any], test: MicroTest, samples_s: list[float]) -> dict[str, Any]:
    """t/s over every sequence (the aggregate); with --npl also per sequence (aggregate / npl)."""
    rates = [test.tokens / s for s in samples_s]
    record = {
        "mode": "micro",
        **common,
        "test": test.name,
        **test.as_dict(),
        "reps": len(samples_s),
        "tokens_per_s": round(mean(rates), 3),
        "tokens_per_s_sd": round(sample_sd(rates), 3),
    }
    if test.npl is not None:
        record["tokens_per_s_per_seq"] = round(mean(rates) / test.npl, 3)
        record["tokens_per_s_per_seq_sd"] = round(sample_sd(rates) / test.npl, 3)
    return {**record, "samples_s": [round(s, 6) for s in samples_s], "synthetic_ids": True}


def add_roofline(record: dict[str, Any], shape: DecodeShape, precision: str, bw: dict[str, Any]) -> None:
    """Average context over the test: depth + the 1-token prompt + half the generated tokens.

    A batched step (--npl N) reads the weights once and each of the N caches: it makes N tokens.
    """
    context = record["depth"] + 1 + record["n_gen"] / 2
    npl = record.get("npl") or 1
    kv = shape.step_bytes(precision, context) - shape.step_bytes(precision, 0)
    step = shape.step_bytes(precision, context) + (npl - 1) * kv
    rate = bw["bytes_per_s"]
    record["bytes_per_step"] = int(step)
    record["bandwidth_gb_s"] = round(rate / 1e9, 3)
    record["bandwidth_method"] = bw["method"]
    record["roofline_tokens_per_s"] = round(npl * roofline_tokens_per_s(step, rate), 3)
    record["roofline_pct"] = round(percent_of_floor(record["tokens_per_s"] / npl, step, rate), 2)


# --- the whole run -------------------------------------------------------------------------------------


@dataclass
class BenchRun:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unavailable: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


def run_plan(plan: Plan, template: Job, *, isolate: bool = True, notify: Notify = _quiet) -> BenchRun:
    """Every configuration in turn, each as `template` with the configuration's settings; Ctrl-C keeps
    what finished."""
    run = BenchRun(unavailable=list(plan.unavailable))
    failures: list[GptcliError] = []
    for index, config in enumerate(plan.configs):
        settings = replace(
            template.settings, backend=config.backend, precision=config.precision, threads=config.threads
        )
        job = replace(
            template,
            settings=settings,
            honours_precision=config.honours_precision,
            remeasure=template.remeasure and index == 0,
        )
        # The precision this configuration runs at is named once its backend has loaded (run_job).
        notify(f"[{index + 1}/{len(plan.configs)}] {config.backend} threads={config.threads}")
        try:
            if isolate and run_isolated(replace(job, prepare_only=True)).get("interrupted"):
                raise KeyboardInterrupt
            result = run_isolated(job) if isolate else run_job(job, notify=notify)
        except KeyboardInterrupt:
            run.interrupted = True
            break
        except GptcliError as exc:  # fp16 ONNX on a CPU, a model one backend cannot export: list it, run the rest
            run.unavailable.append((f"{config.backend} {config.precision}", exc.message))
            failures.append(exc)
            notify(f"warning: {config.backend} {config.precision} skipped: {exc.message}")
            continue
        run.records += result["records"]
        run.skipped += [{**s, "backend": config.backend} for s in result["skipped"]]
        if result.get("interrupted"):
            run.interrupted = True
            break
    if not run.records and not run.interrupted and failures:
        if len(failures) == 1:
            raise failures[0]  # with its own exit code (a model error stays exit 5)
        detail = "; ".join(f"{n}: {r}" for n, r in run.unavailable)
        raise BackendError(f"no backend configuration could run ({detail})")
    add_speedups(run.records)
    return run


def notes_for(mode: str, reps: int, run: BenchRun, in_process: bool) -> list[str]:
    """The notes under a micro or latency table: what was timed, and what was skipped or unavailable."""
    notes = []
    if mode == "micro":
        notes.append(SYNTHETIC_NOTE)
        notes.append(f"t/s is {spread_words(reps)} after a warm-up")
        if any(r.get("npl") is not None for r in run.records):
            notes.append(NPL_NOTE)
        roof = next((r for r in run.records if r.get("roofline_pct") is not None), None)
        if roof is not None:
            notes.append(
                f"% of bw floor: measured t/s over (memory bandwidth {roof['bandwidth_gb_s']:.1f} GB/s, "
                f"{roof['bandwidth_method']}) / (weight + KV bytes one decode step reads); --remeasure re-measures"
            )
    else:
        notes.append(
            f"latency: {reps} pass(es) over the prompts, one request at a time, through the chat template, "
            "tokenizer, sampler and detokenizer; ITL pooled over all requests"
        )
    notes.append(
        "peak mem: the whole process's peak RSS"
        + (" (all backends in one process)" if in_process else ", one process per backend configuration")
    )
    notes += [f"skipped {s['test']} on {s['backend']}: {s['reason']}" for s in run.skipped]
    notes += [f"backend {n} unavailable: {r}" for n, r in run.unavailable]
    return notes


# --- comparisons -----------------------------------------------------------------------------------------


def headline(record: dict[str, Any]) -> float | None:
    """The number a ratio compares, higher = better: t/s for micro and train, 1/E2E for latency."""
    if record["mode"] == "latency":
        e2e = (record.get("e2e_ms") or {}).get("mean")
        return 1000.0 / e2e if e2e else None
    return record.get("tokens_per_s")


def add_speedups(records: list[dict[str, Any]]) -> None:
    """speedup = this / the first backend configuration's result for the same test and threads."""
    configs = list(dict.fromkeys((r["backend"], r["precision"]) for r in records))
    if len(configs) < 2:
        return
    first = configs[0]
    reference = {
        (r["mode"], r["test"], r["threads"]): headline(r) for r in records if (r["backend"], r["precision"]) == first
    }
    for record in records:
        ref = reference.get((record["mode"], record["test"], record["threads"]))
        value = headline(record)
        record["speedup"] = round(value / ref, 3) if ref and value else None
