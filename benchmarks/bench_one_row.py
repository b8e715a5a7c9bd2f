"""The lean engine's float32 one-row kernels on real models: MKL, oneDNN packed and numpy's BLAS, in turns.

    .venv/bin/python benchmarks/bench_one_row.py                              # default model, 2 threads
    .venv/bin/python benchmarks/bench_one_row.py --model gemma3-270m --depth 0,2048 --threads 1,2

One process per (model, threads): the torch backend loads the model once, then each pass decodes
`--tokens` greedy tokens with each kernel forced in turn (after a short warm-up of that kernel, so the
thread pools of the previous one have gone quiet), from the same cache truncated back to the prompt.
Prints tok/s medians, each kernel against the one this machine's measurement chose (lean_tuning), and
the CPU's ISA flags. The choice and its reason come from the cached measurement (`gptcli backends --json`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptcli.backends.base import LoadOptions  # noqa: E402
from gptcli.backends.lean_tuning import MKL, NUMPY_BLAS, ONEDNN  # noqa: E402
from gptcli.backends.torch_backend import TorchBackend  # noqa: E402
from gptcli.hardware import cpu_isa  # noqa: E402
from gptcli.models import resolve_model  # noqa: E402

KERNELS = (MKL, ONEDNN, NUMPY_BLAS)


def rates(model: str, threads: int, depth: int, tokens: int, passes: int) -> tuple[str, dict[str, float]]:
    folder = resolve_model(model, notify=lambda m: print(m, file=sys.stderr)).path
    backend = TorchBackend.load(folder, LoadOptions(device="cpu", dtype="float32", threads=threads))
    lean = backend.engine.lean
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 20000, depth + 8)]
    logits, cache = backend.forward(prompt, backend.new_cache())
    chosen = lean._row_kernel()
    measured: dict[str, list[float]] = {kernel: [] for kernel in KERNELS}
    for _ in range(passes):
        for kernel in KERNELS:
            lean._one_row_kernel = kernel
            for steps in (3, tokens):  # warm-up, then timed
                backend.truncate(cache, len(prompt))
                token = int(np.argmax(logits))
                start = time.perf_counter()
                for _ in range(steps):
                    step_logits, cache = backend.forward([token], cache)
                    token = int(np.argmax(step_logits))
                elapsed = time.perf_counter() - start
            measured[kernel].append(tokens / elapsed)
    lean._one_row_kernel = chosen
    return chosen, {kernel: statistics.median(values) for kernel, values in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="catalogue name or folder (repeatable; default model)")
    parser.add_argument("--threads", default="2", help="comma-separated")
    parser.add_argument("--depth", default="0", help="prompt lengths before decoding, comma-separated")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--passes", type=int, default=4)
    args = parser.parse_args()
    flags = " ".join(name for name, present in vars(cpu_isa()).items() if present) or "no AVX2"
    print(f"CPU flags: {flags}; decode tok/s, median of {args.passes} passes of {args.tokens} tokens")
    print("| model | threads | depth | mkl | onednn-packed | numpy-blas | chosen here | chosen / others |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for model in args.model or ["smollm2-135m-instruct"]:
        for threads in (int(t) for t in args.threads.split(",")):
            for depth in (int(d) for d in args.depth.split(",")):
                chosen, rate = rates(model, threads, depth, args.tokens, args.passes)
                others = ", ".join(f"{rate[chosen] / rate[k]:.2f}x {k}" for k in KERNELS if k != chosen)
                row = " | ".join(f"{rate[k]:.1f}" for k in KERNELS)
                print(f"| {Path(model).name} | {threads} | {depth} | {row} | {chosen} | {others} |", flush=True)


if __name__ == "__main__":
    main()
