"""The torch backend with gptcli's own attention against torch's SDPA, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_attention.py [--dtype bfloat16,float32] [--passes 2]

Runs `gptcli bench -b torch -p 512 -n 32 -d 0,2000 --npl 1,8` (default model, 2 threads) with the native library
(`GPTCLI_NATIVE_KERNELS=1`) and without it (`=0`: SDPA for every attention), alternating which goes first each
pass so drift on a shared machine hits both alike, and prints each cell's aggregate t/s per pass (pp: prefill, tg:
decode) and the median of the per-pass ratios. The CPU's ISA flags head the table (a result holds for the ISA it
was measured on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"native": "1", "sdpa": "0"}


def run(dtype: str, setting: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "gptcli",
        "bench",
        "-b",
        "torch",
        "--dtype",
        dtype,
        "-p",
        str(args.p),
        "-n",
        str(args.n),
    ]
    command += ["-d", args.depth, "--npl", args.npl, "-r", str(args.r), "--threads", str(args.threads), "-o", "json"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPTCLI_NATIVE_KERNELS": SETTINGS[setting]}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"gptcli bench ({dtype}, {setting}) failed: {done.stderr[-500:]}")
    return {row["test"]: row["tokens_per_s"] for row in json.loads(done.stdout)["results"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16,float32")
    parser.add_argument("--depth", default="0,2000")
    parser.add_argument("--npl", default="1,8")
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=32)
    parser.add_argument("-r", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    from gptcli.tuning import kernel_flags

    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for number in range(args.passes):
        for dtype in args.dtype.split(","):
            order = list(SETTINGS) if number % 2 == 0 else list(reversed(SETTINGS))
            for setting in order:
                print(f"pass {number + 1}: {dtype} {setting} ...", file=sys.stderr)
                for test, rate in run(dtype, setting, args).items():
                    cells.setdefault((dtype, test), {}).setdefault(setting, []).append(rate)
    print(f"\n# default model, torch backend, {args.threads} threads; ISA flags: {' '.join(kernel_flags())}")
    print(f"# aggregate t/s per pass (pp{args.p}: prefill, tg{args.n}: decode), npl: sequences in each step,")
    print("# @ dN: N positions cached before the test\n")
    print("| dtype | test | native t/s | SDPA t/s | native / SDPA (median of passes) |")
    print("|---|---|---|---|---|")
    for (dtype, test), rates in cells.items():
        native, sdpa = rates.get("native", []), rates.get("sdpa", [])
        ratios = [a / b for a, b in zip(native, sdpa, strict=False) if b > 0]
        shown = f"{statistics.median(ratios):.2f}×" if ratios else "—"
        print(
            f"| {dtype} | {test} | {' / '.join(f'{r:.1f}' for r in native)} | "
            f"{' / '.join(f'{r:.1f}' for r in sdpa)} | {shown} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
