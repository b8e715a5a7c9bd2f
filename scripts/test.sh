#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
venv="${GPTCLI_VENV:-.venv}"
"$venv/bin/ruff" check src tests benchmarks
"$venv/bin/python" -m pytest -q "$@"
