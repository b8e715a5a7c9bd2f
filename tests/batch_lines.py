"""Batch-file lines run through the batch runner, here (an engine on a runtime) or on a server (`--url`), for the
tests that compare the two."""

from __future__ import annotations

import io
import json
from typing import Any

from gptcli.config import Settings


def run_lines(
    runtime: Any, v1: str, lines: list[dict[str, Any]], settings: Settings, *, remote: bool, running: int = 4
) -> list[dict[str, Any]]:
    """Each line's result, in order: run on `runtime` here, or sent to the server at `v1` (`remote`)."""
    from gptcli.batch_requests import parse_request
    from gptcli.batchfile import LocalLines, RemoteLines, run_batch
    from gptcli.engine import Engine, EngineLimits
    from gptcli.jsonl import ResultWriter, read_lines
    from gptcli.remote import RemoteModel

    data = io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())
    where: Any
    if remote:
        where = RemoteLines(RemoteModel(v1, api_key="unused"), running)
        requests = (parse_request(n, raw, None, settings, 0) for n, raw in read_lines(data))
    else:
        where = LocalLines(Engine(runtime.backend, runtime.tokenizer, EngineLimits(max_running=running)))
        context = runtime.backend.info.context_length
        requests = (parse_request(n, raw, runtime.tokenizer, settings, context) for n, raw in read_lines(data))
    stream = io.StringIO()
    run_batch(where, requests, ResultWriter(stream, sync=False))
    return [json.loads(line) for line in stream.getvalue().splitlines()]
