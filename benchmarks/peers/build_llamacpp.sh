#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-batched-bench, llama-bench, llama-server, llama-quantize) from the sources that
# llama-cpp-python's sdist ships (the version the gptcli-llamacpp plugin pins), and make GGUFs of the default model
# (F32, F16 from the same fp32 HF-format folder gptcli runs; Q8_0, Q4_0 quantized from the F32).
#
#     benchmarks/peers/build_llamacpp.sh          # idempotent: every step is skipped when its output exists
#
# Outputs (all under .cache/peers/, git-ignored; nothing of it is committed):
#     .cache/peers/llama.cpp-build/bin/llama-{batched-bench,bench,server,quantize}
#     .cache/peers/gguf/smollm2-135m-instruct-{F32,F16,Q8_0,Q4_0}.gguf
# Environment: PYTHON (default .venv/bin/python, else python3), JOBS (default 2).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PEERS="$ROOT/.cache/peers"
BUILD="$PEERS/llama.cpp-build"
GGUF_DIR="$PEERS/gguf"
JOBS="${JOBS:-2}"
MODEL_NAME="smollm2-135m-instruct"
TARGETS=(llama-batched-bench llama-server llama-quantize llama-bench)

if [[ -z "${PYTHON:-}" ]]; then
    for candidate in "$ROOT/.venv/bin/python" python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
say() { printf '[build_llamacpp] %s\n' "$*" >&2; }

# 1. The sdist of the pinned llama-cpp-python version.
VERSION="$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' plugins/gptcli-llamacpp/pyproject.toml | head -n 1)"
[[ -n "$VERSION" ]] || { say "cannot read the llama-cpp-python pin from plugins/gptcli-llamacpp/pyproject.toml"; exit 1; }
mkdir -p "$PEERS/sdist" "$GGUF_DIR"
SDIST="$(ls "$PEERS"/sdist/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
    say "downloading the llama-cpp-python $VERSION sdist"
    "$PYTHON" -m pip download --quiet --no-binary llama-cpp-python --no-deps \
        -d "$PEERS/sdist" "llama-cpp-python==$VERSION"
    SDIST="$(ls "$PEERS"/sdist/llama_cpp_python-"$VERSION".tar.gz)"
fi
SRC="$PEERS/llama_cpp_python-$VERSION"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    say "unpacking $SDIST"
    tar -xzf "$SDIST" -C "$PEERS"
fi
LLAMA="$SRC/vendor/llama.cpp"

# 2. The CPU-only Release build of the needed targets.
missing=0
for target in "${TARGETS[@]}"; do [[ -x "$BUILD/bin/$target" ]] || missing=1; done
if (( missing )); then
    say "configuring llama.cpp (Release, CPU only, native ISA) in $BUILD"
    cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF >"$PEERS/cmake-configure.log"
    say "building ${TARGETS[*]} with -j$JOBS (several minutes; log: $PEERS/cmake-build.log)"
    cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}" >"$PEERS/cmake-build.log"
fi

# 3. GGUFs of the default model: F32/F16 from the HF-format folder gptcli itself loads (so F32 is the same weights).
gguf_path() { printf '%s/%s-%s.gguf' "$GGUF_DIR" "$MODEL_NAME" "$1"; }
if [[ ! -s "$(gguf_path F32)" || ! -s "$(gguf_path F16)" ]]; then
    FOLDER="$(PYTHONPATH="$ROOT/src" "$PYTHON" -c '
import sys
from gptcli.config import DEFAULT_MODEL
from gptcli.models import resolve_model
print(resolve_model(DEFAULT_MODEL, notify=lambda m: print(m, file=sys.stderr)).path)')"
    # The converter imports sentencepiece even for a BPE tokenizer.json; a private copy, kept under .cache/peers.
    if ! PYTHONPATH="$PEERS/pydeps" "$PYTHON" -c 'import sentencepiece' 2>/dev/null; then
        say "installing sentencepiece (for the converter) into $PEERS/pydeps"
        "$PYTHON" -m pip install --quiet --target "$PEERS/pydeps" --only-binary :all: sentencepiece
    fi
    for outtype in F32 F16; do
        if [[ ! -s "$(gguf_path "$outtype")" ]]; then
            say "converting $FOLDER to $(gguf_path "$outtype")"
            # The sdist's own gguf-py first, so the converter and its writer are the same version.
            PYTHONPATH="$LLAMA/gguf-py:$PEERS/pydeps" "$PYTHON" "$LLAMA/convert_hf_to_gguf.py" "$FOLDER" \
                --outtype "${outtype,,}" --outfile "$(gguf_path "$outtype").tmp" >"$PEERS/convert-$outtype.log" 2>&1
            mv "$(gguf_path "$outtype").tmp" "$(gguf_path "$outtype")"
        fi
    done
fi
for quant in Q8_0 Q4_0; do
    if [[ ! -s "$(gguf_path "$quant")" ]]; then
        say "quantizing $(gguf_path F32) to $quant"
        "$BUILD/bin/llama-quantize" "$(gguf_path F32)" "$(gguf_path "$quant").tmp" "$quant" \
            >"$PEERS/quantize-$quant.log" 2>&1
        mv "$(gguf_path "$quant").tmp" "$(gguf_path "$quant")"
    fi
done

say "binaries: $BUILD/bin"
ls -l "$GGUF_DIR"/*.gguf >&2

# `python -m llama_cpp.server` (a peer of `gptcli serve` in bench_serve_peers.py) needs packages the project
# does not: install them beside the peers, never into the project's environment.
if [ ! -d "$PEERS/serverdeps/sse_starlette" ]; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$PEERS/serverdeps" \
    sse-starlette starlette-context pydantic-settings python-dotenv
fi
