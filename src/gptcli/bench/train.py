"""Train mode: time optimizer iterations of a training preset/config, report ms/iter, tokens/s, MFU.

The step is gptcli.train.step's, the one `gptcli train` runs (the same GPT-2 shape, AdamW with decay
groups, grad clipping, bf16/fp16 autocast on CUDA, gradient accumulation), on synthetic token ids, so
no corpus is needed and nothing is written. MFU = achieved model FLOPs/s (nanoGPT's 6N + attention
estimate per token) over the device's peak FLOPS (gptcli.hardware: a table for GPUs, cores × clock ×
SIMD width for CPUs), or `--peak-tflops`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptcli.bench.job import Job
from gptcli.bench.report import config_label
from gptcli.bench.stats import mean, sample_sd, spread_words
from gptcli.config import Settings

Notify = Callable[[str], None]
CHAR_VOCAB = 65 + 1  # nanoGPT's Shakespeare characters and the <unk> every char tokenizer adds (train/vocab.py)


def train_config(preset: str | None, config_file: Path | None) -> Any:
    from gptcli.train.config import load_config

    return load_config(preset=preset, config_file=config_file)


def train_job(
    preset: str | None, config_file: Path | None, reps: int, peak_tflops: float | None, settings: Settings
) -> Job:
    """The job for `bench --mode train`: the preset (or config file) by name; shakespeare-char by default."""
    name = preset or (config_file.stem if config_file else None) or "shakespeare-char"
    cfg = train_config(preset or (None if config_file else name), config_file)
    return Job("train", name, reps, settings, train_config=cfg.to_dict(), peak_tflops=peak_tflops)


def train_notes(reps: int) -> list[str]:
    return [
        "train: optimizer iterations (forward, backward, clip, AdamW step) on synthetic token ids after 2 "
        f"warm-up iterations; ms/iter is {spread_words(reps)}",
        "MFU: (6 × params + attention) FLOPs per token × tokens/s over the peak TFLOPS shown",
    ]


def build_model(cfg: Any, notify: Notify) -> tuple[Any, int]:
    """The model the train loop would build (or the --init model), and its vocabulary size."""
    import torch

    from gptcli.hardware import quiet_transformers
    from gptcli.train.step import load_causal_lm, new_gpt2

    quiet_transformers()
    torch.manual_seed(cfg.train.seed)
    if cfg.init:
        from gptcli.models import resolve_model

        model = load_causal_lm(resolve_model(cfg.init, notify=notify).path)
        return model, model.config.vocab_size
    vocab = CHAR_VOCAB if cfg.data.tokenizer == "char" else cfg.data.vocab_size
    return new_gpt2(cfg, vocab, cfg.model.block_size), vocab


def run_train_job(job: Job, *, notify: Notify, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Warm up, then time `reps` optimizer iterations; one record."""
    import torch

    from gptcli.hardware import resolve_device, set_torch_threads
    from gptcli.train.config import load_config
    from gptcli.train.step import mixed_precision, new_optimizer, optimisation_step

    cfg = load_config(base=job.train_config)
    threads = job.settings.threads
    set_torch_threads(threads)
    device = resolve_device(job.settings.device if job.settings.device != "auto" else cfg.train.device)
    model, vocab = build_model(cfg, notify)
    model.to(device).train()
    block = min(cfg.model.block_size, getattr(model.config, "n_positions", None) or cfg.model.block_size)
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum

    precision = mixed_precision(device, cfg.train.dtype)
    notify(f"loaded {config_label({'backend': 'torch', 'device': device, 'precision': precision.name})}")
    optimizer = new_optimizer(model, cfg)
    step_model = torch.compile(model) if cfg.train.compile else model
    generator = torch.Generator().manual_seed(cfg.train.seed)

    def synthetic_batch() -> tuple[Any, Any]:
        data = torch.randint(0, vocab, (batch, block + 1), generator=generator)
        return data[:, :-1].to(device), data[:, 1:].to(device)

    def iteration() -> float:
        batches = [synthetic_batch() for _ in range(accum)]  # made before the clock starts
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        optimisation_step(model, optimizer, precision, batches, accum, cfg.optim.grad_clip, step_model=step_model)
        if device == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    samples: list[float] = []
    interrupted = False
    try:
        for _ in range(job.warmup_iters):
            iteration()
        for rep in range(job.reps):
            notify(f"train: iteration {rep + 1}/{job.reps}")
            samples.append(iteration())
    except KeyboardInterrupt:
        if not samples:
            raise
        interrupted = True
    record = train_record(job, cfg, model, device, precision, threads or torch.get_num_threads(), samples, block)
    return {"records": [record], "skipped": [], "interrupted": interrupted}


def train_record(
    job: Job, cfg: Any, model: Any, device: str, precision: Any, threads: int, samples: list[float], block: int
) -> dict[str, Any]:
    """One result row: time per iteration, tokens/s, achieved TFLOPS and MFU against the peak."""
    from gptcli.bench.measure import peak_memory
    from gptcli.hardware import cuda_device_name, peak_tflops_for
    from gptcli.train.step import flops_per_token

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    tokens = batch * accum * block
    flops = flops_per_token(model, block) * tokens
    peak, source = peak_tflops_for(device, cuda_device_name(device), threads, precision.dtype is not None)
    if job.peak_tflops:
        peak, source = float(job.peak_tflops), "--peak-tflops"
    rates = [tokens / s for s in samples]
    achieved = flops / mean(samples)
    return {
        "mode": "train",
        "model": job.model_name,
        "size_bytes": None,
        "params": sum(p.numel() for p in model.parameters()),
        "backend": "torch",
        "device": device,
        "precision": precision.name,
        "dtype": str(precision.dtype or "float32").removeprefix("torch."),
        "threads": threads,
        "test": f"train b{batch}x{block}" + (f"x{accum}" if accum > 1 else ""),
        "reps": len(samples),
        "ms_per_iter": round(1000 * mean(samples), 3),
        "ms_per_iter_sd": round(1000 * sample_sd(samples), 3),
        "samples_s": [round(s, 6) for s in samples],
        "tokens_per_iter": tokens,
        "tokens_per_s": round(mean(rates), 3),
        "tokens_per_s_sd": round(sample_sd(rates), 3),
        "flops_per_iter": flops,
        "achieved_tflops": round(achieved / 1e12, 4),
        "peak_tflops": round(peak, 3) if peak else None,
        "peak_source": source,
        "mfu_pct": round(100 * achieved / (peak * 1e12), 3) if peak else None,
        "synthetic_ids": True,
        "compiled": cfg.train.compile,
        **peak_memory(),
        "isolated": job.isolated,
    }
