#!/usr/bin/env bash
# Set up (idempotent), lint, check the import contracts, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/setup-plugins.sh  # the llama.cpp backend plugin (builds llama-cpp-python once; pip caches the wheel)
bash scripts/setup-browser.sh  # Debian's chromium + playwright, for the chat page's browser test
venv="${GPTCLI_VENV:-.venv}"
"$venv/bin/ruff" check src tests benchmarks plugins scripts
# The layering (ARCHITECTURE.md; contracts in pyproject.toml), on this checkout's sources.
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/lint-imports" --no-cache
# --durations: the slowest tests, to keep the suite under its 15-minute budget on a 2-core machine.
# Two worker processes (pytest-xdist; GPTCLI_TEST_WORKERS=0: one process), each file's tests on one worker so
# that a file's module fixtures (a live server, a loaded model) are made once: many tests wait on a gptcli
# subprocess's start or a server, so two workers take the suite from 18-21 to 11-13 minutes on an AVX2-only
# 2-core machine.
workers="${GPTCLI_TEST_WORKERS:-2}"
if [[ "$workers" == 0 ]]; then dist=(); else dist=(-n "$workers" --dist loadfile); fi
"$venv/bin/python" -m pytest -q "${dist[@]}" --durations=25 "$@"
