#!/usr/bin/env bash
# Idempotent set-up of what the chat page's browser test needs (re-running it is a no-op):
#   - Debian's chromium (apt), the browser the test drives headless; skipped when /usr/bin/chromium exists
#   - the playwright Python package in ${GPTCLI_VENV:-.venv}, which drives it (no browser download:
#     the test launches the system chromium through executable_path)
# Without root or apt, it says so and leaves the browser test to skip with its reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${GPTCLI_VENV:-.venv}"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (apt) for the chat page's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "warning: no /usr/bin/chromium and no root apt-get: the browser test will skip" >&2
  fi
fi
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c "import playwright" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "playwright>=1.40"
fi
