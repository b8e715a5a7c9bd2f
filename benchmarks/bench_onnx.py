"""ONNX backend vs the torch backend (and onnxruntime-genai when it can be imported), same run, same prompts.

    .venv/bin/python benchmarks/bench_onnx.py                      # default model, 2 threads
    .venv/bin/python benchmarks/bench_onnx.py --threads 1 --decode 64 --passes 3
    PYTHONPATH=.cache/genai-peer .venv/bin/python benchmarks/bench_onnx.py   # include the genai peer

Measures, per row: decode tok/s (greedy, one token per step after a short prompt), prefill tok/s of a
512-token prompt, and cold start (a fresh `gptcli generate -n 1` process to its first output byte, export
cached and in the page cache).
Prints medians over passes and ratios against torch and against onnxruntime-genai at the same precision.
Exports are built (once) before timing; peer models are built with genai's own builder into .cache/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptcli.backends.base import LoadOptions  # noqa: E402
from gptcli.models import resolve_model  # noqa: E402
from gptcli.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def timed_ours(backend, prompt_ids: list[int], long_ids: list[int], decode: int) -> tuple[float, float]:
    cache = backend.new_cache()
    start = time.perf_counter()
    backend.forward(long_ids, cache)
    prefill = len(long_ids) / (time.perf_counter() - start)
    cache = backend.new_cache()
    logits, cache = backend.forward(prompt_ids, cache)
    start = time.perf_counter()
    for _ in range(decode):
        logits, cache = backend.forward([int(np.argmax(logits))], cache)
    return decode / (time.perf_counter() - start), prefill


def cold_start(model: str, backend: str, precision: str, threads: int, home: str) -> float:
    env = {**os.environ, "GPTCLI_HOME": home}
    cmd = [sys.executable, "-m", "gptcli", "generate", "Hi", "-m", model, "--backend", backend, "-n", "1"]
    cmd += ["--precision", precision, "--threads", str(threads), "--temperature", "0", "--device", "cpu"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    first = proc.stdout.read(1)  # the first byte of the first token: what a user waits for
    elapsed = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0 or not first:
        sys.exit(f"cold start run failed:\n{err.decode()[-2000:]}")
    return elapsed


def genai_runner(folder: Path, precision: str, threads: int) -> Callable | None:
    """A (decode, prefill) measurer over onnxruntime-genai's own export, or None when it is not importable."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    out = REPO / ".cache" / "genai-models" / f"{folder.name}-{precision}"
    if not (out / "genai_config.json").is_file():
        cache = REPO / ".cache" / "genai-models" / "hf-cache"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
        cmd += ["-p", precision, "-e", "cpu", "-c", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"genai builder failed ({precision}): {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
    config = og.Config(str(out))
    config.clear_providers()
    model = og.Model(config)

    def run(prompt_ids: list[int], long_ids: list[int], decode: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(long_ids) + 8, do_sample=False)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(np.array(long_ids, dtype=np.int32))
        prefill = len(long_ids) / (time.perf_counter() - start)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt_ids) + decode + 2, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array(prompt_ids, dtype=np.int32))
        start = time.perf_counter()
        for _ in range(decode):
            gen.generate_next_token()
        return decode / (time.perf_counter() - start), prefill

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument(
        "--no-spin", dest="spin", action="store_false", help="idle ORT threads sleep (GPTCLI_ORT_SPIN=0)"
    )
    args = parser.parse_args()

    home = os.environ.get("GPTCLI_HOME") or str(REPO / ".cache" / "test-home")
    os.environ["GPTCLI_HOME"] = home
    local = resolve_model(args.model, notify=lambda m: print(m, file=sys.stderr))
    tok = Tokenizer(local.path)
    prompt_ids = tok.encode(PROMPT)
    long_ids = (tok.encode(" ".join([PROMPT] * 40)) * 2)[:512]
    precisions = args.precisions.split(",")

    from gptcli.backends.onnx_backend import OnnxBackend
    from gptcli.export import ensure_export

    # Cold starts first, while this process holds no models: measured after the decode passes they
    # came out 1.5x slower for fp32. Each is a fresh process, the export cached and, after one
    # untimed run, in the page cache (this VM's memory reclaim evicts idle pages).
    cold = {}
    if not args.no_cold:
        cold_rows = [("gptcli onnx", p, "onnx") for p in precisions] + (
            [] if args.no_torch else [("gptcli torch", "fp32", "torch")]
        )
        for name, precision, backend_name in cold_rows:
            if backend_name == "onnx":
                ensure_export(local.path, precision=precision, device="cpu")
            cold_start(args.model, backend_name, precision, args.threads, home)
            runs = [cold_start(args.model, backend_name, precision, args.threads, home) for _ in range(3)]
            cold[(name, precision)] = statistics.median(runs)

    rows: list[tuple[str, str, Callable, str | None]] = []

    for precision in precisions:
        options = LoadOptions(
            device="cpu", precision=precision, threads=args.threads, extra={"ort_spinning": args.spin}
        )
        backend = OnnxBackend.load(local.path, options)
        rows.append(("gptcli onnx", precision, lambda p, lg, d, b=backend: timed_ours(b, p, lg, d), "onnx"))
    for precision in precisions:
        if precision in {"fp32", "int4"}:
            runner = genai_runner(local.path, precision, args.threads)
            if runner is not None:
                rows.append(("onnxruntime-genai", precision, runner, None))
    if not args.no_torch:
        from gptcli.backends.torch_backend import TorchBackend

        torch_backend = TorchBackend.load(local.path, LoadOptions(device="cpu", dtype="float32", threads=args.threads))
        rows.append(("gptcli torch", "fp32", lambda p, lg, d: timed_ours(torch_backend, p, lg, d), "torch"))

    results: dict[tuple[str, str], list[tuple[float, float]]] = {(n, p): [] for n, p, _, _ in rows}
    for _ in range(args.passes):  # interleave rows so drift hits all of them alike
        for name, precision, run, _ in rows:
            run(prompt_ids, long_ids[:64], 4)  # warm-up
            results[(name, precision)].append(run(prompt_ids, long_ids, args.decode))

    summary = {
        key: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for key, runs in results.items()
    }
    torch_decode = summary.get(("gptcli torch", "fp32"), (None, None))[0]
    print(f"model {local.name} · {args.threads} threads · decode {args.decode} tok · prefill 512 tok · median of "
          f"{args.passes} passes")  # fmt: skip
    header = f"{'runtime':<18} {'prec':<5} {'decode tok/s':>12} {'prefill tok/s':>13} {'cold s':>7}"
    header += f" {'× torch':>8} {'× genai':>8}"
    print(header)
    print("-" * len(header))
    for (name, precision), (decode, prefill) in summary.items():
        peer = summary.get(("onnxruntime-genai", precision))
        vs_torch = f"{decode / torch_decode:.2f}" if torch_decode else "-"
        vs_genai = f"{decode / peer[0]:.2f}" if peer and name != "onnxruntime-genai" else "-"
        cold_s = f"{cold[(name, precision)]:.2f}" if (name, precision) in cold else "-"
        print(f"{name:<18} {precision:<5} {decode:>12.1f} {prefill:>13.1f} {cold_s:>7} {vs_torch:>8} {vs_genai:>8}")


if __name__ == "__main__":
    main()
