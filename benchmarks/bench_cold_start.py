"""Cold start: a fresh `gptcli generate` process to its first output byte, this checkout against variants.

    .venv/bin/python benchmarks/bench_cold_start.py                          # onnx int4, 15 rounds
    .venv/bin/python benchmarks/bench_cold_start.py --variant "typer 0.29=/tmp/typer029"   # a dependency swapped in
    .venv/bin/python benchmarks/bench_cold_start.py --variant "no pyc=/tmp/src-copy" -- --backend torch

A variant is NAME=DIR: DIR goes first on PYTHONPATH (a wheel unpacked there, or a copy of src/ without
__pycache__), so the same command runs with that one thing changed. The processes take turns round by
round, so the drift of a shared machine hits all alike; the export is made and the page cache warmed
before timing. Prints medians and minima, and each variant's median against this checkout's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gptcli.hardware import cpu_isa

REPO = Path(__file__).resolve().parents[1]
GPTCLI = str(Path(sys.executable).with_name("gptcli"))
DEFAULT_ARGS = ["--backend", "onnx", "--precision", "int4"]


def first_byte(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from process start to the first byte on stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    assert proc.stdout is not None
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("gptcli_args", nargs="*", help="after --: generate's flags (default: onnx int4)")
    args = parser.parse_args()
    cmd = [GPTCLI, "generate", "-n", "4", "--temperature", "0", *(args.gptcli_args or DEFAULT_ARGS), "hi"]
    envs = {"this checkout": dict(os.environ)}
    for spec in args.variant:
        name, _, folder = spec.partition("=")
        path = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
        envs[name] = dict(os.environ, PYTHONPATH=path)
    for env in envs.values():  # the export, the page cache
        first_byte(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in envs}
    for _ in range(args.rounds):
        for name, env in envs.items():
            times[name].append(first_byte(cmd, env))
    flags = [name for name, present in vars(cpu_isa()).items() if present]
    print(f"`{' '.join(['gptcli', *cmd[1:]])}`, first output byte, {args.rounds} rounds, cpu: {' '.join(flags)}")
    print("| variant | median s | min s | vs this checkout |\n|---|---:|---:|---:|")
    base = statistics.median(times["this checkout"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
