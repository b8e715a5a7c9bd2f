"""Decode speed per model family: the torch lean engine against transformers' engine, on the tiny test models.

    .venv/bin/python benchmarks/bench_families.py                 # 1 thread, 64 decode steps, 3 passes
    .venv/bin/python benchmarks/bench_families.py --threads 2 --decode 128 --passes 5

Each family's tiny random model (tests/family_models.py: 2 layers, hidden 64) is built in a temporary
folder, loaded twice through the torch backend (GPTCLI_TORCH_IMPL=auto → lean, =hf → transformers), and
decoded greedily one token per step after a 16-token prompt. Prints a Markdown table of median decode
tok/s and the lean/transformers ratio. On models this small the numbers measure per-step overhead
(Python, masks, cache bookkeeping), not weight streaming: they say how much each engine adds per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.family_models import FAMILY_MODELS, build_model  # noqa: E402

from gptcli.backends.base import LoadOptions  # noqa: E402
from gptcli.backends.torch_backend import TorchBackend  # noqa: E402

PROMPT = list(range(3, 19))


def decode_rate(backend: TorchBackend, steps: int) -> float:
    """Greedy decode tokens per second after the prompt's prefill (the prefill is not timed)."""
    logits, cache = backend.forward(PROMPT, backend.new_cache())
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = backend.forward([int(np.argmax(logits))], cache)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    options = LoadOptions(device="cpu", dtype="float32", threads=args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ["llama", *FAMILY_MODELS]:
            folder = build_model(Path(tmp) / family, family)
            rates = {}
            for impl in ("auto", "hf"):
                os.environ["GPTCLI_TORCH_IMPL"] = impl
                backend = TorchBackend.load(folder, options)
                decode_rate(backend, 8)  # warm-up
                rates[backend.implementation] = statistics.median(
                    decode_rate(backend, args.decode) for _ in range(args.passes)
                )
            rows.append((family, rates["lean"], rates["hf"]))
    print(f"decode tok/s, tiny models (2 layers, hidden 64), {args.threads} thread(s), median of {args.passes}")
    print("| family | torch lean | transformers | lean / transformers |")
    print("|---|---:|---:|---:|")
    for family, lean, hf in rows:
        print(f"| {family} | {lean:,.0f} | {hf:,.0f} | {lean / hf:.1f}x |")


if __name__ == "__main__":
    main()
