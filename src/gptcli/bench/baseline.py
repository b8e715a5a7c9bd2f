"""Compare a run with a saved one: match by (model, backend, precision, test, threads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptcli.atomicio import write_atomic
from gptcli.bench.runner import headline
from gptcli.errors import GptcliError, InputError

KEY_FIELDS = ("model", "backend", "precision", "test", "threads")


def key_of(record: dict[str, Any]) -> tuple:
    return tuple(record.get(k) for k in KEY_FIELDS)


def load_records(path: Path) -> list[dict[str, Any]]:
    """A `-o json` document, a JSON list, or JSON lines (`-o jsonl`, `--output FILE`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"baseline file not found: {path}", hint="save one with --output FILE or -o json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read baseline {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
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
            except ValueError:
                raise InputError(
                    f"{path}:{number}: not JSON", hint="a baseline is the output of -o json, -o jsonl or --output"
                ) from None
    records = [r for r in records if isinstance(r, dict) and all(k in r for k in ("mode", *KEY_FIELDS))]
    if not records:
        raise InputError(f"{path} holds no benchmark results", hint="save one with --output FILE or -o json")
    return records


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


def regressions(records: list[dict[str, Any]], fail_below: float) -> list[dict[str, Any]]:
    return [r for r in records if r.get("baseline") and r["baseline"]["ratio"] < fail_below]


def check_regressions(records: list[dict[str, Any]], fail_below: float, baseline: Path) -> None:
    """A GptcliError (exit 1) naming the worst result when any fell below `fail_below` × the baseline,
    or when none had a baseline to compare with (a gate that compared nothing must not pass)."""
    if not any(record.get("baseline") for record in records):
        raise GptcliError(
            f"no result matched one in {baseline}: nothing was compared",
            hint="results match by model, backend, precision, test and threads; run the same configuration",
        )
    slow = regressions(records, fail_below)
    if slow:
        worst = min(slow, key=lambda r: r["baseline"]["ratio"])
        raise GptcliError(
            f"{len(slow)} result(s) fell below {fail_below:g}x the baseline; worst: {worst['test']} on "
            f"{worst['backend']} {worst['precision']} at {worst['baseline']['ratio']:.2f}x",
            hint=f"compared with {baseline}",
        )


def append_jsonl(path: Path, lines: list[str]) -> None:
    """Append whole lines atomically: the old file plus the new lines, written aside then renamed."""
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_atomic(path, old + "".join(line + "\n" for line in lines).encode("utf-8"))
