"""Compare a run with a saved one: match by (model, backend, precision, test, threads); save a run
(`--output`, JSON lines); and check those paths and `--fail-below` before anything runs."""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from gptcli.atomicio import write_atomic
from gptcli.bench.runner import headline
from gptcli.errors import GptcliError, InputError, UsageError
from gptcli.jsonl import MAX_LINE_BYTES, parse_line
from gptcli.paths import environment_error
from gptcli.textio import Limit, MiB, decode_text, read_bounded

KEY_FIELDS = ("model", "backend", "precision", "test", "threads")
BASELINE_LIMIT = Limit(64 * MiB, "a bench baseline", "compare with recent runs: tail -n 1000 runs.jsonl > recent.jsonl")
MAX_FAIL_BELOW = 10.0  # a ratio; a larger value is a percentage by mistake (--fail-below 90)


def key_of(record: dict[str, Any]) -> tuple:
    """What a result matches by; a latency run also by its workload (its E2E grows with --max-tokens and the
    prompts' length: a run with -n 16 against one with -n 8 was a '0.53x' regression)."""
    key = tuple(record.get(k) for k in KEY_FIELDS)
    if record.get("mode") != "latency":
        return key
    prompt_tokens, requests = record.get("prompt_tokens"), record.get("requests")
    numbers = all(isinstance(n, int) and not isinstance(n, bool) for n in (prompt_tokens, requests))
    mean_prompt = round(prompt_tokens / requests, 1) if numbers and requests else None
    return (*key, record.get("max_tokens"), mean_prompt)


def load_records(path: Path) -> list[dict[str, Any]]:
    """A `-o json` document, a JSON list, or JSON lines (`-o jsonl`, `--output FILE`)."""
    try:
        with path.open("rb") as handle:
            data = read_bounded(handle, str(path), BASELINE_LIMIT)
    except FileNotFoundError:
        raise InputError(f"baseline file not found: {path}", hint="save one with --output FILE or -o json") from None
    except OSError as exc:
        raise InputError(f"cannot read baseline {path}: {exc.strerror or exc}") from None
    text = decode_text(data, str(path))
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # JSON lines, or not JSON (each line says which below)
        data = None
    if isinstance(data, dict) and isinstance(data.get("results"), list):
        records = data["results"]
    elif isinstance(data, list):
        records = data
    elif isinstance(data, dict):
        records = [data]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except (ValueError, RecursionError):
                raise InputError(
                    f"{path}:{number}: not JSON", hint="a baseline is the output of -o json, -o jsonl or --output"
                ) from None
    records = [r for r in records if isinstance(r, dict) and all(k in r for k in ("mode", *KEY_FIELDS))]
    if not records:
        raise InputError(f"{path} holds no benchmark results", hint="save one with --output FILE or -o json")
    for number, record in enumerate(records, 1):
        _check_record(record, f"{path}: result {number}")
    return records


def _check_record(record: dict[str, Any], where: str) -> None:
    """A saved result that comparing can use: plain key values (a list cannot be matched) and a headline
    number that is absent or a finite one, not negative (a word or a NaN would break or fool the ratio)."""
    hint = "fix or remove that result; a baseline is the output of -o json, -o jsonl or --output"
    for name in KEY_FIELDS:
        if not isinstance(record[name], str | int | float | bool | None):
            raise InputError(f"{where}: '{name}' must be a plain value, got {json.dumps(record[name])[:60]}", hint=hint)
    name, value = "tokens_per_s", record.get("tokens_per_s")
    if record["mode"] == "latency":
        e2e = record.get("e2e_ms")
        if e2e is not None and not isinstance(e2e, dict):
            raise InputError(
                f"{where}: 'e2e_ms' must be a mapping of statistics, got {json.dumps(e2e)[:60]}", hint=hint
            )
        name, value = "e2e_ms.mean", (e2e or {}).get("mean")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (number and math.isfinite(value) and value >= 0):
        raise InputError(f"{where}: '{name}' must be a number of at least 0, got {json.dumps(value)[:60]}", hint=hint)


def compare(records: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """Set record['baseline'] = {'ratio', 'value'} (ratio > 1: faster than the baseline); the latest
    matching baseline record wins. Records with no match get baseline None."""
    latest = {key_of(r): r for r in baseline}
    for record in records:
        match = latest.get(key_of(record))
        value, reference = headline(record), headline(match) if match else None
        if match is None or not value or not reference:
            record["baseline"] = None
            continue
        record["baseline"] = {"ratio": round(value / reference, 3), "value": round(reference, 3)}


def check_fail_below(ratio: float | None) -> None:
    """--fail-below: a finite ratio to the baseline (0.9: fail when over 10% slower), above 0 and at most
    MAX_FAIL_BELOW; NaN, 0 or a negative one could never fail, a percentage (90) always would."""
    if ratio is not None and not (math.isfinite(ratio) and 0 < ratio <= MAX_FAIL_BELOW):
        raise UsageError(
            f"--fail-below must be a ratio to the baseline above 0 and at most {MAX_FAIL_BELOW:g}, got {ratio:g}",
            hint="e.g. --fail-below 0.9 fails when a result is over 10% slower than the baseline",
        )


def regressions(records: list[dict[str, Any]], fail_below: float) -> list[dict[str, Any]]:
    return [r for r in records if r.get("baseline") and r["baseline"]["ratio"] < fail_below]


def check_regressions(records: list[dict[str, Any]], fail_below: float, baseline: Path) -> None:
    """A GptcliError (exit 1) naming the worst result when any fell below `fail_below` × the baseline,
    or when none had a baseline to compare with (a gate that compared nothing must not pass)."""
    if not any(record.get("baseline") for record in records):
        raise GptcliError(
            f"no result matched one in {baseline}: nothing was compared",
            hint="results match by model, backend, precision, test and threads (latency: also --max-tokens and the"
            " prompts); run the same configuration",
        )
    slow = regressions(records, fail_below)
    if slow:
        worst = min(slow, key=lambda r: r["baseline"]["ratio"])
        raise GptcliError(
            f"{len(slow)} result(s) fell below {fail_below:g}x the baseline; worst: {worst['test']} on "
            f"{worst['backend']} {worst['precision']} at {worst['baseline']['ratio']:.2f}x",
            hint=f"compared with {baseline}",
        )


def check_output(path: Path | None) -> None:
    """--output before anything runs: an existing regular file, or a new one (its missing folders are
    made) under a folder this process may write in; an InputError (exit 6) naming the path otherwise."""
    if path is None:
        return
    hint = "give a file to append the results to, e.g. --output runs.jsonl"
    mode = _mode_of(path)
    if mode is not None and stat.S_ISDIR(mode):
        raise InputError(f"--output {path} is a folder", hint=hint)
    if mode is not None and not stat.S_ISREG(mode):
        raise InputError(f"--output {path} is not a regular file", hint=hint)
    if mode is not None and not os.access(path, os.R_OK):
        raise _unwritable(path, "cannot be read (the results are appended to it)", errno.EACCES)
    if mode is not None and not _holds_results(path):  # a -o json document, a prompts file: lines would break it
        raise InputError(
            f"--output {path} does not hold bench results as JSON lines (its first line is not one)",
            hint="appending would break it: give a new file, or one --output wrote (an -o json document is a "
            "--baseline as it is)",
        )
    folder = path.parent
    while _mode_of(folder) is None and folder != folder.parent:
        folder = folder.parent
    folder_mode = _mode_of(folder)
    if folder_mode is None or not stat.S_ISDIR(folder_mode):
        raise InputError(f"--output {path}: {folder} is not a folder", hint=hint)
    if not os.access(folder, os.W_OK | os.X_OK):
        number = errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES
        raise _unwritable(path, f"cannot create a file in {folder} ({os.strerror(number)})", number)


def _unwritable(path: Path, cause: str, number: int) -> GptcliError:
    """--output refused by the disk or the permissions, said (and its exit code chosen) as for any output path."""
    return environment_error(OSError(number, cause, str(path))) or GptcliError(f"{path}: {cause}")


def _holds_results(path: Path) -> bool:
    """Whether a file is empty or starts with a result line, as --output and -o jsonl write them."""
    with path.open("rb") as handle:
        first = handle.readline(MAX_LINE_BYTES + 1)
    try:
        record = parse_line(first) if first.strip() else {"mode": None}
    except ValueError:
        return False
    return isinstance(record, dict) and "mode" in record


def _mode_of(path: Path) -> int | None:
    """The st_mode of `path` (links followed), None when nothing is there; an InputError when it cannot be looked at."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # a folder on the way that may not be looked in
        raise environment_error(exc) or InputError(
            f"--output {path}: {exc.strerror or exc}", hint="check the path"
        ) from None


def save_results(path: Path, lines: list[str]) -> None:
    """append_jsonl, a failed write (a full disk, a folder that became read-only) as one line naming the file."""
    try:
        append_jsonl(path, lines)
    except OSError as exc:
        raise GptcliError(
            f"cannot append the results to {path}: {exc.strerror or exc}",
            hint="the results went to stdout only; free some space or fix the path, then run again",
        ) from None


def append_jsonl(path: Path, lines: list[str]) -> None:
    """Append whole lines atomically: the old file plus the new lines, written aside then renamed (the old
    file is copied in pieces: a long history is never held in memory whole)."""
    write_atomic(path, "".join(line + "\n" for line in lines), keep_old=True)
