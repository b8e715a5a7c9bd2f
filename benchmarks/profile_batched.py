"""Where a batched decode step's time goes, op by op, as the engine runs it (issue 13).

    .venv/bin/python benchmarks/profile_batched.py --precision int4 --rows 1,8

Loads the default model through gptcli's ONNX backend (`OnnxBackend`: the KV pool bound as both past and
present, so GroupQueryAttention writes in place, as in `gptcli serve`), prefills `--rows` sequences of a
47-token prompt one by one, then times `--steps` batched greedy decode steps over all of them with ONNX
Runtime's profiler on. Prints, per row count: the median step unprofiled and per op type the profiled ms a
step and its share. benchmarks/profile_ops.py does the same for one sequence in a plain session, with bytes
and bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gptcli.backends.base import LoadOptions
from gptcli.backends.onnx_backend import OnnxBackend
from gptcli.models import resolve_model

PROMPT_TOKENS = 47  # bench_batch.py's prompts average this many


def profiled_backend(folder: Path, precision: str, threads: int) -> OnnxBackend:
    """The backend with ORT's profiler switched on in its session options (the backend builds them itself)."""
    real_init = ort.InferenceSession.__init__

    def with_profiling(self: Any, path: Any, options: Any = None, *args: Any, **kwargs: Any) -> None:
        if options is not None:
            options.enable_profiling = True
            options.profile_file_prefix = "/tmp/gptcli-profile-batched"
        real_init(self, path, options, *args, **kwargs)

    ort.InferenceSession.__init__ = with_profiling
    try:
        return OnnxBackend.load(folder, LoadOptions(device="cpu", precision=precision, threads=threads))
    finally:
        ort.InferenceSession.__init__ = real_init


def profile(folder: Path, precision: str, threads: int, rows: int, steps: int) -> tuple[float, dict[str, float]]:
    backend = profiled_backend(folder, precision, threads)
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(rows):
        logits, cache = backend.forward(rng.integers(100, 40000, PROMPT_TOKENS).tolist(), backend.new_cache())
        batch.append(([int(np.asarray(logits).reshape(-1, logits.shape[-1])[-1].argmax())], cache))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, caches = backend.step(batch)
        times.append(time.perf_counter() - start)
        rows_logits = np.asarray(logits).reshape(rows, -1, logits.shape[-1])[:, -1]
        batch = [([int(row.argmax())], cache) for row, cache in zip(rows_logits, caches, strict=True)]
    trace_file = Path(backend.session.end_profiling())
    trace = json.loads(trace_file.read_text())
    os.remove(trace_file)
    runs = [e for e in trace if e.get("name") == "model_run"][rows:]  # the prefills came first
    first = runs[0]["ts"]
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first:
            per_op[event["args"].get("op_name", "?")] += event["dur"] / len(runs) / 1000
    per_op["run (profiled)"] = statistics.fmean(e["dur"] for e in runs) / 1000
    return statistics.median(times) * 1000, dict(per_op)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--rows", default="1,8", help="sequences decoding together, comma-separated")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = resolve_model(args.model).path
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx", "amx", "fma"))})
    print(f"{args.model} onnx {args.precision}, {args.threads} threads; CPU flags: {' '.join(flags)}\n")
    for rows in (int(r) for r in args.rows.split(",")):
        step_ms, per_op = profile(folder, args.precision, args.threads, rows, args.steps)
        run = per_op.pop("run (profiled)")
        kernels = sum(per_op.values())
        print(f"{rows} rows: step {step_ms:.2f} ms unprofiled ({rows * 1000 / step_ms:.0f} tok/s), {run:.2f} profiled")
        print("| op | ms a step | share of the profiled step |\n|---|---:|---:|")
        for op, ms in sorted(per_op.items(), key=lambda item: -item[1])[:10]:
            print(f"| {op} | {ms:.2f} | {100 * ms / run:.0f} % |")
        print(f"| outside any kernel (the executor) | {run - kernels:.2f} | {100 * (run - kernels) / run:.0f} % |\n")


if __name__ == "__main__":
    main()
