"""Run a benchmark: the configuration matrix (backend × precision × threads), one job per
configuration, each in its own child process so its peak memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gptcli.bench.measure import peak_memory, time_micro, time_requests
from gptcli.bench.roofline import (
    DecodeShape,
    bandwidth,
    decode_shape,
    known_precision,
    percent_of_floor,
    roofline_tokens_per_s,
)
from gptcli.bench.spec import MicroTest
from gptcli.bench.stats import mean, sample_sd
from gptcli.config import SamplingConfig, Settings
from gptcli.errors import BackendError, ConfigError, GptcliError, InputError, ModelError, UsageError

Notify = Callable[[str], None]
DTYPE_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# Backends known to honour LoadOptions.precision even if they do not declare `precisions`.
PRECISION_AWARE = {"onnx"}
SYNTHETIC_NOTE = (
    "micro tests feed synthetic token ids straight to backend.forward: tokenization and sampling are not timed"
)


def _quiet(_: str) -> None:
    pass


# --- settings across the process boundary ---------------------------------------------------------


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    data = asdict(settings)
    data["sampling"]["stop"] = list(settings.sampling.stop)
    return data


def settings_from_dict(data: dict[str, Any]) -> Settings:
    sampling = dict(data.get("sampling", {}))
    sampling["stop"] = tuple(sampling.get("stop", ()))
    return Settings(**{**data, "sampling": SamplingConfig(**sampling)})


# --- planning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One column of the comparison: a backend at a precision with a thread count."""

    backend: str
    precision: str
    threads: int
    honours_precision: bool = True


@dataclass
class Plan:
    configs: list[Config]
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (backend, reason)


def declared_precisions(backend_cls: type) -> tuple[str, ...] | None:
    value = getattr(backend_cls, "precisions", None)
    if value is not None:
        return tuple(value)
    return None


def plan_configs(
    backends: list[str] | None,
    precisions: list[str],
    threads: list[int],
    device: str,
) -> Plan:
    """Check every backend before anything runs. Unknown names are an error (exit 4); a backend that
    cannot run here is reported with its reason and skipped, unless none is left."""
    from gptcli.backends.base import get_backend_class, list_backends

    registered = list(dict.fromkeys(s.name for s in list_backends() if not s.conflict))
    for name in backends or []:
        if name not in registered:
            get_backend_class(name)  # raises the registry's own error: unknown, or a plugin turned off
    plan = Plan([])
    for name in backends or registered:
        try:
            backend_cls = get_backend_class(name)
            reason = backend_cls.unavailable_reason(device)
        except BackendError as exc:  # a plugin that fails to import is unavailable, not fatal
            reason = exc.message
        if reason:
            plan.unavailable.append((name, reason))
            continue
        declared = declared_precisions(backend_cls)
        honours = declared is not None or name in PRECISION_AWARE
        usable = [p for p in precisions if declared is None or p in declared]
        if declared is not None and not usable:
            plan.unavailable.append((name, f"supports precisions {', '.join(declared)} only"))
            continue
        # A backend that ignores --precision (torch: --dtype decides) runs once per thread count.
        for precision in usable if honours else usable[:1]:
            for count in threads:
                plan.configs.append(Config(name, precision, count, honours))
    if not plan.configs:
        detail = "; ".join(f"{n}: {r}" for n, r in plan.unavailable) or "no backend is registered"
        raise BackendError(f"no backend can run here ({detail})", hint="`gptcli backends` lists what can run here")
    return plan


# --- one job: load once, run every test ------------------------------------------------------------


def run_job(job: dict[str, Any], *, notify: Notify = _quiet, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Load the backend of one configuration and run the job's tests; returns records (JSON-ready)."""
    from gptcli.runtime import check_backend, load_options

    if job["mode"] == "train":
        if job.get("prepare_only"):
            return {"records": [], "skipped": []}
        from gptcli.bench.train import run_train_job

        return run_train_job(job, notify=notify, clock=clock)
    settings = settings_from_dict(job["settings"])
    backend_cls = check_backend(settings)
    folder = Path(job["model_path"])
    if job.get("prepare_only"):
        # One-time work (an ONNX export, a conversion) happens here, in a throwaway process, so the
        # measured process's peak memory is what every later run costs.
        backend_cls.load(folder, load_options(settings))
        return {"records": [], "skipped": []}
    honours = job.get("honours_precision", True)
    notify(f"loading {settings.backend}{f' {settings.precision}' if honours else ''} ({settings.threads} threads)")
    backend = backend_cls.load(folder, load_options(settings))
    info = backend.info
    precision = settings.precision if honours else DTYPE_PRECISION.get(info.dtype, info.dtype)
    shape = _decode_shape_or_none(folder)
    weights_bytes = getattr(backend, "weights_bytes", None)
    if weights_bytes is None and shape is not None and known_precision(precision):
        weights_bytes = int(shape.weight_bytes(precision))
    common = {
        "model": job["model_name"],
        "size_bytes": weights_bytes,
        "params": info.params,
        "backend": backend_cls.name,
        "device": info.device,
        "precision": precision,
        "dtype": info.dtype,
        "threads": settings.threads,
    }
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    interrupted = False
    try:
        if job["mode"] == "micro":
            run_micro_tests(job, backend, common, records, skipped, clock=clock, notify=notify)
        else:
            records.append(run_latency(job, backend, folder, common, clock=clock, notify=notify))
    except KeyboardInterrupt:  # keep what finished; the parent prints it
        interrupted = True
    memory = peak_memory()
    for record in records:
        record.update(memory)
        record["isolated"] = job.get("isolated", False)
    decode = [r for r in records if r["mode"] == "micro" and r["n_prompt"] == 0]
    if decode and shape is not None and known_precision(precision):
        # Measured last, so its buffer never counts in the peak memory above.
        try:
            bw = None if interrupted else bandwidth(info.device, remeasure=job.get("remeasure", False), notify=notify)
        except KeyboardInterrupt:
            interrupted, bw = True, None
        except Exception as exc:  # no roofline is better than no benchmark
            notify(f"warning: cannot measure memory bandwidth on {info.device}: {type(exc).__name__}: {exc}")
            bw = None
        for record in decode if bw else []:
            add_roofline(record, shape, precision, bw)
    return {"records": records, "skipped": skipped, "interrupted": interrupted}


def run_micro_tests(
    job: dict[str, Any],
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
    for raw in job["tests"]:
        test = MicroTest(**raw)
        needed = test.context_needed()
        if needed > context:
            skipped.append({"test": test.name, "reason": f"needs {needed} positions; the context holds {context}"})
            continue
        notify(f"{common['backend']} {common['precision']}: {test.name}")
        samples = time_micro(backend, test, job["reps"], clock=clock, warmup=job.get("warmup", True), notify=notify)
        records.append(micro_record(common, test, samples))


def run_latency(
    job: dict[str, Any],
    backend: Any,
    folder: Path,
    common: dict[str, Any],
    *,
    clock: Callable[[], float],
    notify: Notify,
) -> dict[str, Any]:
    from gptcli.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    sampling = SamplingConfig(**{**job["sampling"], "stop": tuple(job["sampling"].get("stop", ()))})
    samples = time_requests(
        backend,
        tokenizer,
        job["prompts"],
        sampling,
        job["reps"],
        clock=clock,
        notify=notify,
        warmup=job.get("warmup", True),
    )
    return {
        "mode": "latency",
        **common,
        "test": "latency",
        "max_tokens": sampling.max_tokens,
        "reps": job["reps"],
        **samples.summary(),
    }


def _decode_shape_or_none(folder: Path) -> DecodeShape | None:
    try:
        shape = decode_shape(folder)
    except (GptcliError, OSError, ValueError, KeyError):
        return None
    return shape if shape.streamed_params > 0 else None


def micro_record(common: dict[str, Any], test: MicroTest, samples_s: list[float]) -> dict[str, Any]:
    rates = [test.tokens / s for s in samples_s]
    return {
        "mode": "micro",
        **common,
        "test": test.name,
        **test.as_dict(),
        "reps": len(samples_s),
        "tokens_per_s": round(mean(rates), 3),
        "tokens_per_s_sd": round(sample_sd(rates), 3),
        "samples_s": [round(s, 6) for s in samples_s],
        "synthetic_ids": True,
    }


def add_roofline(record: dict[str, Any], shape: DecodeShape, precision: str, bw: dict[str, Any]) -> None:
    """Average context over the test: depth + the 1-token prompt + half the generated tokens."""
    context = record["depth"] + 1 + record["n_gen"] / 2
    step = shape.step_bytes(precision, context)
    rate = bw["bytes_per_s"]
    record["bytes_per_step"] = int(step)
    record["bandwidth_gb_s"] = round(rate / 1e9, 3)
    record["bandwidth_method"] = bw["method"]
    record["roofline_tokens_per_s"] = round(roofline_tokens_per_s(step, rate), 3)
    record["roofline_pct"] = round(percent_of_floor(record["tokens_per_s"], step, rate), 2)


# --- isolation: one child process per configuration ---------------------------------------------------


def error_from_exit_code(code: int) -> type[GptcliError]:
    """The error class a worker's exit code stands for, so the parent re-raises the same kind."""
    for cls in (BackendError, ConfigError, InputError, ModelError, UsageError):
        if cls.exit_code == code:
            return cls
    return GptcliError


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """Run `run_job` in a fresh interpreter; its progress goes straight to our stderr.

    Ctrl-C reaches the worker too (same process group): it stops, and hands over what it finished.
    Here the first Ctrl-C only sets a flag (a raising handler could drop the worker's answer in
    flight); a second one kills the worker.
    """
    import signal
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcli.bench.worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    interrupts: list[int] = []

    def on_interrupt(signum: int, _frame: Any) -> None:
        interrupts.append(signum)
        if len(interrupts) > 1:
            proc.kill()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if main_thread else None
    try:
        out, _ = proc.communicate(json.dumps({**job, "isolated": True}).encode())
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    stdout = out.decode().strip()
    if not stdout and (interrupts or proc.returncode in (130, -2)):
        raise KeyboardInterrupt
    try:
        result = json.loads(stdout.splitlines()[-1])
    except (ValueError, IndexError):
        raise GptcliError(
            f"benchmark worker for {job['settings']['backend']} exited with status {proc.returncode} and no result",
            hint="set GPTCLI_DEBUG=1 for its traceback, or pass --in-process",
        ) from None
    if interrupts:
        result["interrupted"] = True
    if "error" in result:
        raise error_from_exit_code(result.get("exit_code", 1))(result["error"], hint=result.get("hint"))
    return result


# --- the whole run -------------------------------------------------------------------------------------


@dataclass
class BenchRun:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    unavailable: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


def run_plan(
    plan: Plan,
    base: Settings,
    job_template: dict[str, Any],
    *,
    isolate: bool = True,
    notify: Notify = _quiet,
) -> BenchRun:
    """Every configuration in turn; Ctrl-C keeps what finished."""
    run = BenchRun(unavailable=list(plan.unavailable))
    for index, config in enumerate(plan.configs):
        settings = replace(base, backend=config.backend, precision=config.precision, threads=config.threads)
        job = {
            **job_template,
            "settings": settings_to_dict(settings),
            "honours_precision": config.honours_precision,
            "remeasure": job_template.get("remeasure", False) and index == 0,
        }
        label = f" {config.precision}" if config.honours_precision else ""
        notify(f"[{index + 1}/{len(plan.configs)}] {config.backend}{label} threads={config.threads}")
        try:
            if isolate and run_isolated({**job, "prepare_only": True}).get("interrupted"):
                raise KeyboardInterrupt
            result = run_isolated(job) if isolate else run_job(job, notify=notify)
        except KeyboardInterrupt:
            run.interrupted = True
            break
        except BackendError as exc:  # e.g. fp16 ONNX on a CPU: list it, run the rest
            run.unavailable.append((f"{config.backend} {config.precision}", exc.message))
            notify(f"warning: {config.backend} {config.precision} skipped: {exc.message}")
            continue
        run.records += result["records"]
        run.skipped += [{**s, "backend": config.backend} for s in result["skipped"]]
        if result.get("interrupted"):
            run.interrupted = True
            break
    if not run.records and not run.interrupted and run.unavailable and len(run.unavailable) > len(plan.unavailable):
        detail = "; ".join(f"{n}: {r}" for n, r in run.unavailable)
        raise BackendError(f"no backend configuration could run ({detail})")
    add_speedups(run.records)
    return run


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
