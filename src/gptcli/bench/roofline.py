"""The roofline for decoding: a decode step must read every weight once (plus the KV cache), so
memory bandwidth / bytes-per-step is the fastest any backend can generate on this machine.

We measure the machine's read bandwidth once (cached under the gptcli cache, `--remeasure` redoes it),
count the bytes a decode step reads for a backend and precision, and report each tg result as a
percentage of that ceiling ("% of the bandwidth floor": 100% means the step took exactly the time the
bytes need to stream from memory).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gptcli.atomicio import write_atomic
from gptcli.hf import header_tensors, read_architecture
from gptcli.paths import cache_dir

# Effective bytes per weight element as stored for a decode step. int8 carries a per-channel scale
# (negligible); int4 carries one fp32 scale per block of 32 (ORT MatMulNBits' default): 0.5 + 4/32.
# GGUF types (from a llama.cpp plugin's dtype label) count their block headers: Q4_0 stores 32
# weights in 18 bytes, Q4_1 in 20, Q8_0 in 34; K-quants are averages for their usual mixes.
BYTES_PER_WEIGHT = {
    "fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.625,
    "f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32,
    "q4_k_m": 4.85 / 8, "q5_k_m": 5.69 / 8, "q6_k": 6.5625 / 8,
}  # fmt: skip
# The KV cache: fp32 unless the model runs in 16-bit; llama.cpp keeps an f16 cache for quantized models.
BYTES_PER_KV = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 4.0, "int4": 4.0, "f32": 4.0}
GGUF_KV_BYTES = 2.0


def known_precision(label: str) -> bool:
    return label.lower() in BYTES_PER_WEIGHT


TOKEN_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
POSITION_EMBEDDINGS = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight")
LM_HEADS = ("lm_head.weight", "embed_out.weight")


@dataclass(frozen=True)
class DecodeShape:
    """Element counts that decide what a decode step reads."""

    total_params: int
    streamed_params: int  # weights a decode step reads in full (the lm_head once, embeddings' one row skipped)
    kv_elements_per_position: int  # K and V over all layers for one cached position

    def step_bytes(self, precision: str, context: float) -> float:
        """Bytes read by one decode step with `context` positions cached."""
        label = precision.lower()
        weights = self.streamed_params * BYTES_PER_WEIGHT[label]
        kv = self.kv_elements_per_position * context * BYTES_PER_KV.get(label, GGUF_KV_BYTES)
        return weights + kv

    def weight_bytes(self, precision: str) -> float:
        return self.total_params * BYTES_PER_WEIGHT[precision.lower()]


def decode_shape(folder: Path) -> DecodeShape:
    """Count from config.json and the safetensors headers (no weights are loaded)."""
    arch = read_architecture(folder)
    total = token = position = 0
    has_head = False
    for tensor in header_tensors(folder):
        total += tensor.count
        if tensor.name.endswith(TOKEN_EMBEDDINGS):
            token += tensor.count
        elif tensor.name.endswith(POSITION_EMBEDDINGS):
            position += tensor.count
        elif tensor.name.endswith(LM_HEADS):
            has_head = True
    # Tied embeddings: no lm_head tensor, the embedding matrix is read in full as the output head.
    streamed = total - position - (token if has_head else 0)
    return DecodeShape(total, streamed, 2 * arch.layers * arch.kv_heads * arch.head_dim)


def roofline_tokens_per_s(step_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """The most decode steps per second the memory system allows."""
    return bandwidth_bytes_per_s / step_bytes


def percent_of_floor(tokens_per_s: float, step_bytes: float, bandwidth_bytes_per_s: float) -> float:
    """100 × measured / roofline: equivalently, the bandwidth floor time over the measured step time."""
    return 100.0 * tokens_per_s / roofline_tokens_per_s(step_bytes, bandwidth_bytes_per_s)


# --- measuring bandwidth -------------------------------------------------------------------------


def _best_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # touch the pages, warm the code path
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_cpu_bandwidth(size_mib: int = 256, repeats: int = 10) -> tuple[float, str]:
    """Read bandwidth in bytes/s over a buffer far larger than any CPU cache: the best of a
    multi-threaded GEMV (what a decode step is) and threaded reductions (sum, max) on every usable
    core. A lower bound: kernels with more loads in flight can stream a little faster."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    columns = 4096
    rows = size_mib * 2**20 // (4 * columns)
    matrix = np.ones((rows, columns), dtype=np.float32)
    vector = np.ones(columns, dtype=np.float32)
    nbytes = matrix.nbytes
    workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    chunks = np.array_split(matrix, workers)
    results = {"numpy GEMV": nbytes / _best_time(lambda: matrix @ vector, repeats)}
    with ThreadPoolExecutor(workers) as pool:
        for name, reduce in (("sum", np.sum), ("max", np.max)):
            seconds = _best_time(lambda reduce=reduce: list(pool.map(reduce, chunks)), repeats)
            results[f"numpy threaded {name} ({workers} threads)"] = nbytes / seconds
    method = max(results, key=results.__getitem__)
    return results[method], method


def measure_cuda_bandwidth(size_mib: int = 1024, repeats: int = 20) -> tuple[float, str]:
    import torch

    buffer = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32, device="cuda")

    def run() -> None:
        buffer.sum()
        torch.cuda.synchronize()

    rate = buffer.numel() * 4 / _best_time(run, repeats)
    torch.cuda.empty_cache()
    return rate, "torch.sum on the device"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def device_key(device: str) -> str:
    """The cache key: the device kind and its model name, so a different machine measures again."""
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name()}"
    return f"cpu:{cpu_model()}"


def bandwidth_cache_file() -> Path:
    return cache_dir() / "bench" / "bandwidth.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def bandwidth(
    device: str, *, remeasure: bool = False, notify: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """{'bytes_per_s', 'method', 'device', 'measured_at', 'cached'} for 'cpu' or 'cuda', cached per machine."""
    key = device_key(device)
    path = bandwidth_cache_file()
    cache = _read_cache(path)
    entry = cache.get(key)
    if entry and not remeasure:
        return {**entry, "cached": True}
    notify(f"measuring memory bandwidth of {key} (cached in {path})")
    rate, method = measure_cuda_bandwidth() if device.startswith("cuda") else measure_cpu_bandwidth()
    entry = {
        "bytes_per_s": rate,
        "method": method,
        "device": key,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    cache = _read_cache(path)  # another process may have written meanwhile
    cache[key] = entry
    try:
        write_json_atomic(path, cache)
    except OSError as exc:  # a full disk, a read-only GPTCLI_HOME: the measurement still serves this run
        notify(f"warning: cannot cache the memory bandwidth in {path}: {exc.strerror} (measured again next time)")
    return {**entry, "cached": False}
