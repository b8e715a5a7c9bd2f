"""Choices measured once per machine: which kernel is fastest here, cached beside the exports.

A choice is a JSON-able record made by a `measure` function the first time it is asked for under a
key (the CPU's flags, library versions, threads: whatever decides the answer) and read back after
that, so a machine keeps making the same choice (and so the same numbers) from run to run. Used by
the onnx export (the MatMulNBits compute type, export/nbits_choice.py) and the torch lean engine
(the float32 kernel for one-row products, backends/lean_base.py). A damaged file is measured again.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptcli.atomicio import write_atomic
from gptcli.hardware import cpu_flags
from gptcli.paths import cache_dir
from gptcli.paths import cache_key as files_key

# The flags that decide which x86 kernels run (and so which of two wins).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def tuning_file() -> Path:
    return cache_dir() / "tuning.json"


def kernel_flags() -> list[str]:
    flags = cpu_flags()
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def machine_key(*parts: str) -> str:
    """A key for a choice: the kernel flags and `parts` (library versions, threads)."""
    return files_key(",".join(kernel_flags()), *parts, length=16)


Valid = Callable[[dict[str, Any]], bool]


def cached(name: str, key: str, valid: Valid | None = None) -> dict[str, Any] | None:
    """The record stored for `name` under `key`, or None (also for one that `valid` refuses: damaged)."""
    try:
        record = json.loads(tuning_file().read_text(encoding="utf-8"))[name][key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(record, dict) or (valid is not None and not valid(record)):
        return None
    return record


def tuned(name: str, key: str, measure: Callable[[], dict[str, Any]], valid: Valid | None = None) -> dict[str, Any]:
    """The record for `name` under `key`: cached, or measured now (again, where `valid` refuses it) and stored,
    unless it says it is `provisional` (a measurement the machine disturbed: it holds for this run only)."""
    record = cached(name, key, valid)
    if record is None:
        record = measure()
        if not record.get("provisional"):
            store(name, key, record)
    return record


def median_ms(seconds: list[float]) -> float:
    """The median of timed passes in ms, the first (warm-up) pass left out."""
    return round(statistics.median(seconds[1:]) * 1e3, 3)


def store(name: str, key: str, record: dict[str, Any]) -> None:
    """Cache `record`. A cache that cannot be written (a full disk, a read-only GPTCLI_HOME) keeps nothing and
    fails nothing: the choice holds for this run (an export into --output, a generate), the next measures again."""
    path = tuning_file()
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    section = stored.get(name)
    stored[name] = {**(section if isinstance(section, dict) else {}), key: record}
    with contextlib.suppress(OSError):
        write_atomic(path, json.dumps(stored, indent=2) + "\n")
