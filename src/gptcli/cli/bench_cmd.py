"""`gptcli bench`: llama-bench micro tests, vLLM-style latency, training steps; backends side by side."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from gptcli.cli import common as c
from gptcli.cli import render
from gptcli.errors import EXIT_INTERRUPTED, InputError, UsageError


def bench(
    ctx: typer.Context,
    model: c.ModelOpt = None,
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend",
            "-b",
            help="Comma-separated backends (default: every one here).",
            autocompletion=c.complete_backend_list,
        ),
    ] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="Comma-separated: fp32,fp16,int8,int4 (exported backends).")
    ] = None,
    threads: Annotated[str | None, typer.Option("--threads", help="Comma-separated thread counts.")] = None,
    device: c.DeviceOpt = None,
    dtype: c.DtypeOpt = None,
    n_prompt: Annotated[str, typer.Option("--n-prompt", "-p", help="Prefill sizes: ppN tests (0 = none).")] = "512",
    n_gen: Annotated[str, typer.Option("--n-gen", "-n", help="Generation lengths: tgN tests (0 = none).")] = "128",
    pg: Annotated[list[str] | None, typer.Option("--pg", help="A ppN+tgM test as 'N,M' (repeatable).")] = None,
    depth: Annotated[str, typer.Option("--depth", "-d", help="KV depths to run each test at ('@ dD').")] = "0",
    npl: Annotated[
        str | None, typer.Option("--npl", help="Parallel sequences (1-256), each step batched (llama-batched-bench).")
    ] = None,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Timed repetitions (after a warm-up).")] = 5,
    mode: Annotated[str, typer.Option("--mode", help="micro | latency | train.")] = "micro",
    prompts: Annotated[
        Path | None, c.path_option("--prompts", help="Latency mode: a text file, one prompt per line.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Latency mode: most new tokens per request.")] = 128,
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", help="Latency mode: sampling temperature (0 = greedy).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Latency mode: sampling seed (fixed for comparability).")] = 0,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="Train mode: a training preset name.", autocompletion=c.complete_preset),
    ] = None,
    train_config_file: Annotated[
        Path | None, c.path_option("--train-config", help="Train mode: a training config file.")
    ] = None,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Train mode: the device's peak TFLOPS for MFU.")
    ] = None,
    output_format: Annotated[str, typer.Option("--output-format", "-o", help="table | md | csv | json | jsonl.")] = (
        "table"
    ),
    output: Annotated[
        Path | None, c.path_option("--output", help="Also append every result as a JSON line to this file.")
    ] = None,
    baseline: Annotated[
        Path | None, c.path_option("--baseline", help="Compare with a saved run (-o json/jsonl or --output).")
    ] = None,
    fail_below: Annotated[
        float | None, typer.Option("--fail-below", help="With --baseline: exit 1 if any ratio is under this.")
    ] = None,
    remeasure: Annotated[bool, typer.Option("--remeasure", help="Measure memory bandwidth again.")] = False,
    in_process: Annotated[
        bool, typer.Option("--in-process", help="Run every backend in this process (peak memory then mixes them).")
    ] = False,
    config: c.ConfigOpt = None,
    allow_pickle: c.AllowPickleOpt = None,
    trust_remote_code: c.TrustRemoteCodeOpt = None,
) -> None:
    """Benchmark backends side by side: llama-bench tests, request latency, or a training step.

    Micro tests time backend.forward on synthetic token ids; tg rows show the share of the bandwidth floor.

    Examples:
      gptcli bench
      gptcli bench --backend torch,onnx --precision fp32,int8 -p 128,512 -o md
      gptcli bench -p 512 -n 128 --depth 0,1024
      gptcli bench -p 512 -n 128 --npl 1,2,4,8
      gptcli bench --mode latency --prompts prompts.txt --max-tokens 128
      gptcli bench --output runs.jsonl
      gptcli bench --baseline runs.jsonl --fail-below 0.9    # exit 1 if slower
      gptcli bench --mode train --preset shakespeare-char
    """
    from dataclasses import replace

    from gptcli.bench import baseline as base_mod
    from gptcli.bench import report, spec
    from gptcli.bench.environment import environment
    from gptcli.bench.job import MODES, Job
    from gptcli.bench.measure import read_prompts
    from gptcli.bench.plan import plan_configs
    from gptcli.bench.runner import notes_for, run_plan
    from gptcli.config import FIELDS, MAX_THREADS, coerce, with_sampling
    from gptcli.hardware import default_threads

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
    spec.check_mode_options(mode, c.given_options(ctx))
    if output_format not in report.FORMATS:
        raise UsageError(f"-o/--output-format must be one of {', '.join(report.FORMATS)}, got '{output_format}'")
    spec.check_repetitions(repetitions)
    if fail_below is not None and baseline is None:
        raise UsageError("--fail-below needs --baseline FILE")
    base_mod.check_fail_below(fail_below)
    base_mod.check_output(output)
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise UsageError(f"--peak-tflops must be a positive number, got {peak_tflops:g}", hint="e.g. --peak-tflops 312")

    backends = spec.name_list(backend, "--backend") if backend is not None else None
    precisions = (
        [coerce(FIELDS["precision"], p, "--precision") for p in spec.name_list(precision, "--precision")]
        if precision is not None
        else None
    )
    thread_counts = (
        spec.int_list(threads, "--threads", minimum=1, maximum=MAX_THREADS, example="1,2")
        if threads is not None
        else None
    )
    tests = []
    if mode == "micro":
        pairs = [spec.pair(p, "--pg") for p in pg or []]
        sizes = spec.int_list(n_prompt, "-p"), spec.int_list(n_gen, "-n"), pairs, spec.int_list(depth, "--depth")
        tests = spec.micro_tests(*sizes, spec.npl_list(npl))
    prompt_texts = read_prompts(prompts) if mode == "latency" else []
    baseline_records = base_mod.load_records(baseline) if baseline is not None else None

    settings = c.resolve_settings(
        config,
        model=model,
        device=device,
        dtype=dtype,
        temperature=temperature,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    ).settings
    thread_counts = thread_counts or [settings.threads or default_threads()]

    if mode == "train":
        from gptcli.bench.train import train_job, train_notes

        plan = plan_configs(["torch"], ["fp32"], thread_counts, settings.device)
        job = train_job(preset, train_config_file, repetitions, peak_tflops, settings)
    else:
        plan = plan_configs(backends, precisions or [settings.precision], thread_counts, settings.device)
        for name, reason in plan.unavailable:
            c.warn(f"backend '{name}' skipped: {reason}")
        from gptcli.cli.local_run import open_local_model

        sampling = with_sampling(settings, max_tokens=max_tokens, seed=seed).sampling  # checked before loading
        local = open_local_model(settings)
        job = Job(
            mode,
            local.name,
            repetitions,
            replace(settings, model=str(local.path)),
            model_path=str(local.path),
            tests=tuple(tests),
            prompts=tuple(prompt_texts),
            sampling=sampling,
            remeasure=remeasure,
        )
    quiet = render.verbosity() == render.QUIET  # a worker process's progress lines too
    run = run_plan(plan, replace(job, quiet=quiet), isolate=not in_process, notify=c.note)
    notes = train_notes(repetitions) if mode == "train" else notes_for(mode, repetitions, run, in_process)
    records = run.records

    if baseline_records is not None:
        base_mod.compare(records, baseline_records)
    env = environment()
    extra = {"unavailable": [{"backend": n, "reason": r} for n, r in run.unavailable], "skipped": run.skipped}
    if records:
        text = report.render(output_format, records, environment=env, notes=notes, extra=extra)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    elif run.skipped and not run.interrupted:
        detail = "; ".join(f"{s['test']} on {s['backend']}: {s['reason']}" for s in run.skipped[:4])
        raise InputError(f"no test ran ({detail})", hint="lower -p / -n / --depth / --npl to fit")
    if output is not None and records:
        base_mod.save_results(output, report.jsonl_lines(records, env))
        c.note(f"appended {len(records)} result(s) to {output}")
    if run.interrupted:
        c.stderr_console().print("interrupted", style="yellow")
        raise typer.Exit(EXIT_INTERRUPTED)
    if baseline is not None and fail_below is not None:
        base_mod.check_regressions(records, fail_below, baseline)
