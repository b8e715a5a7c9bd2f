"""llamacpp plugin (Q4_1 GGUF, native) vs the torch backend (dequantised fp32) on the default model.

    .venv/bin/python benchmarks/bench_llamacpp.py [--prompt 128] [--tokens 64] [--rounds 3] [--threads 2]

Times `backend.forward` directly, the way the decoding loop calls it: one prefill of a synthetic prompt,
then single-token decode steps (greedy). The backends take turns round by round, so drift on a shared
machine hits both alike; the table shows medians and the ratio against torch.
The full comparison with onnx and more metrics is `gptcli bench --backend torch,onnx,llamacpp`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def measure(backend, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for one greedy run on a fresh cache."""
    import numpy as np

    start = time.perf_counter()
    logits, cache = backend.forward(prompt, backend.new_cache())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        logits, cache = backend.forward([int(np.argmax(logits))], cache)
    decode = time.perf_counter() - start
    return len(prompt) / prefill, tokens / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from gptcli.backends.base import LoadOptions, get_backend_class
    from gptcli.config import DEFAULT_MODEL
    from gptcli.models import resolve_model

    folder = resolve_model(DEFAULT_MODEL, notify=lambda m: print(m, file=sys.stderr)).path
    options = LoadOptions(device="cpu", dtype="float32", threads=args.threads)
    backends = {name: get_backend_class(name).load(folder, options) for name in ("torch", "llamacpp")}
    # A different prompt every round: llamacpp keeps the last prompt in its context and would re-use it.
    prompts = [[(i * 37 + r * 101) % 4000 + 100 for i in range(args.prompt)] for r in range(args.rounds + 1)]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    for backend in backends.values():  # warm-up
        measure(backend, prompts[-1][:16], 4)
    for r in range(args.rounds):
        for name, backend in backends.items():
            results[name].append(measure(backend, prompts[r], args.tokens))

    base_prefill = statistics.median(p for p, _ in results["torch"])
    base_decode = statistics.median(d for _, d in results["torch"])
    print(
        f"default model, CPU, {args.threads} threads, prompt {args.prompt}, {args.tokens} new tokens, "
        f"median of {args.rounds}"
    )
    print("| backend | weights | prefill tok/s | vs torch | decode tok/s | vs torch |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        prefill = statistics.median(p for p, _ in rows)
        decode = statistics.median(d for _, d in rows)
        print(
            f"| {name} | {backends[name].info.dtype} | {prefill:.1f} | {prefill / base_prefill:.2f}x "
            f"| {decode:.1f} | {decode / base_decode:.2f}x |"
        )


if __name__ == "__main__":
    main()
