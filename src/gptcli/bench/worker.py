"""`python -m gptcli.bench.worker`: run one benchmark job (JSON on stdin) and print its result as
one JSON line on stdout. Progress goes to stderr. Used so each configuration has its own process."""

from __future__ import annotations

import json
import os
import sys

from gptcli.errors import EXIT_INTERRUPTED, GptcliError


def _notify(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def main() -> int:
    from gptcli.bench.runner import run_job

    job = json.loads(sys.stdin.read())
    try:
        result = run_job(job, notify=_notify)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except GptcliError as exc:
        result = {"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
    except Exception as exc:
        if os.environ.get("GPTCLI_DEBUG", "") not in {"", "0", "false"}:
            raise
        result = {"error": f"internal error: {type(exc).__name__}: {exc}", "hint": "set GPTCLI_DEBUG=1", "exit_code": 1}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
