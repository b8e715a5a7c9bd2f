"""Decode speed per model family, and on Gemma 3 270M: the fast paths against transformers and llama.cpp.

    .venv/bin/python benchmarks/bench_families.py                 # 1 thread, 64 decode steps, 3 passes
    .venv/bin/python benchmarks/bench_families.py --threads 2 --decode 128 --passes 5
    .venv/bin/python benchmarks/bench_families.py --threads 2 --only-gemma   # the issue's targets, CPU, 2 threads

Tiny table: each family's tiny random model (tests/family_models.py: 2 layers, hidden 64) is built in a
temporary folder, loaded twice through the torch backend (GPTCLI_TORCH_IMPL=auto → lean, =hf →
transformers), and decoded greedily one token per step after a 16-token prompt. On models this small the
numbers measure per-step overhead (Python, masks, cache bookkeeping), not weight streaming.

Gemma 3 270M (when pulled: `gptcli models pull gemma3-270m`; its folder under $GPTCLI_HOME, or the test
cache .cache/test-home of this checkout): torch lean fp32 against transformers' engine, and the onnx int4
export against llama.cpp (the gptcli-llamacpp plugin) on the same Q4_K_M GGUF. The engines take turns pass
by pass, so drift on a shared machine hits all alike; medians of decode tok/s after a 32-token prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.family_models import FAMILY_MODELS, build_model  # noqa: E402

from gptcli.backends.base import LoadOptions  # noqa: E402
from gptcli.backends.torch_backend import TorchBackend  # noqa: E402

PROMPT = list(range(3, 19))
GEMMA_TEXT = "The history of the city begins in the first century, when a small settlement grew on the river bank"


def decode_rate(backend: Any, steps: int, prompt: list[int] = PROMPT) -> float:
    """Greedy decode tokens per second after the prompt's prefill (the prefill is not timed)."""
    logits, cache = backend.forward(prompt, backend.new_cache())
    start = time.perf_counter()
    for _ in range(steps):
        logits, cache = backend.forward([int(np.argmax(logits))], cache)
    return steps / (time.perf_counter() - start)


def tiny_table(args: argparse.Namespace) -> None:
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


def gemma_folder() -> Path | None:
    """The pulled Gemma 3 270M: under $GPTCLI_HOME (or the platform cache), else in this checkout's test cache."""
    from gptcli.errors import GptcliError
    from gptcli.models import resolve_model

    for home in (os.environ.get("GPTCLI_HOME"), str(REPO / ".cache" / "test-home")):
        if home is not None:
            os.environ["GPTCLI_HOME"] = home
        try:
            return resolve_model("gemma3-270m").path
        except GptcliError:
            continue
    return None


def gemma_table(args: argparse.Namespace) -> None:
    from gptcli.backends.onnx_backend import OnnxBackend
    from gptcli.tokenizer import Tokenizer

    folder = gemma_folder()
    if folder is None:
        print("\nGemma 3 270M is not pulled: `gptcli models pull gemma3-270m` first")
        return
    prompt = Tokenizer(folder).encode(GEMMA_TEXT)[:32]
    quiet = {"notify": lambda _: None}
    engines: dict[str, Any] = {}
    for impl in ("lean", "hf"):
        os.environ["GPTCLI_TORCH_IMPL"] = impl
        engines[f"torch {impl} fp32"] = TorchBackend.load(
            folder, LoadOptions(device="cpu", dtype="float32", threads=args.threads)
        )
    os.environ["GPTCLI_TORCH_IMPL"] = "auto"
    engines["onnx int4"] = OnnxBackend.load(
        folder, LoadOptions(device="cpu", precision="int4", threads=args.threads, extra=quiet)
    )
    try:
        from gptcli_llamacpp.backend import LlamaCppBackend
    except ImportError:
        print("\nthe gptcli-llamacpp plugin is not installed: no llama.cpp row")
    else:
        engines["llama.cpp Q4_K_M"] = LlamaCppBackend.load(folder, LoadOptions(device="cpu", threads=args.threads))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for backend in engines.values():
        decode_rate(backend, 4, prompt)  # warm-up
    for _ in range(args.passes):  # taking turns
        for name, backend in engines.items():
            rates[name].append(decode_rate(backend, args.decode, prompt))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\nGemma 3 270M, decode tok/s after a {len(prompt)}-token prompt, {args.threads} thread(s), "
          f"median of {args.passes} passes of {args.decode} tokens")  # fmt: skip
    print("| engine | decode tok/s | ratio | target |")
    print("|---|---:|---:|---|")
    lean, hf = median["torch lean fp32"], median["torch hf fp32"]
    print(f"| torch lean fp32 | {lean:.1f} | {lean / hf:.2f}x transformers | >= 2x |")
    print(f"| transformers fp32 | {hf:.1f} | | |")
    onnx = median["onnx int4"]
    if "llama.cpp Q4_K_M" in median:
        llama = median["llama.cpp Q4_K_M"]
        print(f"| onnx int4 | {onnx:.1f} | {onnx / llama:.2f}x llama.cpp | >= 1x |")
        print(f"| llama.cpp Q4_K_M (plugin) | {llama:.1f} | | |")
    else:
        print(f"| onnx int4 | {onnx:.1f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--passes", type=int, default=3)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only-gemma", action="store_true", help="skip the tiny-model table")
    which.add_argument("--no-gemma", action="store_true", help="skip Gemma 3 270M")
    args = parser.parse_args()
    if not args.only_gemma:
        tiny_table(args)
    if not args.no_gemma:
        gemma_table(args)


if __name__ == "__main__":
    main()
