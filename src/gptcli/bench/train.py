"""Train mode: time optimizer iterations of a training preset/config, report ms/iter, tokens/s, MFU.

The step mirrors gptcli.train's loop (the same GPT-2 shape, AdamW with decay groups, grad clipping,
bf16/fp16 autocast on CUDA, gradient accumulation) on synthetic token ids, so no corpus is needed and
nothing is written. MFU = achieved model FLOPs/s (nanoGPT's 6N + attention estimate per token) over the
device's peak FLOPS: a table for GPUs, an estimate from cores × clock × SIMD width for CPUs, or
`--peak-tflops`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptcli.bench.stats import mean, sample_sd

Notify = Callable[[str], None]
CHAR_VOCAB = 65  # nanoGPT's Shakespeare character set: the vocabulary a char preset ends up with


def train_config(preset: str | None, config_file: Path | None) -> Any:
    from gptcli.train.config import load_config

    return load_config(preset=preset, config_file=config_file)


def build_model(cfg: Any, notify: Notify) -> tuple[Any, int]:
    """The model the train loop would build (or the --init model), and its vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptcli.hardware import quiet_transformers
    from gptcli.train.loop import new_gpt2

    quiet_transformers()
    torch.manual_seed(cfg.train.seed)
    if cfg.init:
        from gptcli.models import resolve_model

        folder = resolve_model(cfg.init, notify=notify).path
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return model, model.config.vocab_size
    vocab = CHAR_VOCAB if cfg.data.tokenizer == "char" else cfg.data.vocab_size
    return new_gpt2(cfg, vocab, cfg.model.block_size), vocab


def run_train_job(job: dict[str, Any], *, notify: Notify, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Warm up, then time `reps` optimizer iterations; one record."""

    import torch
    import torch.nn.functional as F

    from gptcli.bench.measure import peak_memory
    from gptcli.hardware import cuda_device_name, peak_tflops_for, resolve_device
    from gptcli.train.config import load_config
    from gptcli.train.loop import flops_per_token, mixed_precision, new_optimizer

    cfg = load_config(base=job["train_config"])
    threads = job["settings"]["threads"]
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(job["settings"]["device"] if job["settings"]["device"] != "auto" else cfg.train.device)
    model, vocab = build_model(cfg, notify)
    model.to(device).train()
    block = min(cfg.model.block_size, getattr(model.config, "n_positions", None) or cfg.model.block_size)
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum

    half, autocast, scaler = mixed_precision(device, cfg.train.dtype)
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
        for x, y in batches:
            with autocast():
                logits = step_model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)) / accum
            scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return clock() - start

    samples: list[float] = []
    interrupted = False
    try:
        for _ in range(job.get("warmup_iters", 2)):
            iteration()
        for rep in range(job["reps"]):
            notify(f"train: iteration {rep + 1}/{job['reps']}")
            samples.append(iteration())
    except KeyboardInterrupt:
        if not samples:
            raise
        interrupted = True

    tokens = batch * accum * block
    flops = flops_per_token(model, block) * tokens
    used_threads = threads or torch.get_num_threads()
    peak, source = peak_tflops_for(device, cuda_device_name(device), used_threads, half is not None)
    if job.get("peak_tflops"):
        peak, source = float(job["peak_tflops"]), "--peak-tflops"
    rates = [tokens / s for s in samples]
    achieved = flops / mean(samples)
    record = {
        "mode": "train",
        "model": job["model_name"],
        "size_bytes": None,
        "params": sum(p.numel() for p in model.parameters()),
        "backend": "torch",
        "device": device,
        "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(half, "fp32"),
        "dtype": str(half or torch.float32).removeprefix("torch."),
        "threads": threads or torch.get_num_threads(),
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
        "isolated": job.get("isolated", False),
    }
    return {"records": [record], "skipped": [], "interrupted": interrupted}
