"""A 40 KB summary, chunks in parallel through the engine against `--parallel 1`, in one run.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_summarize.py [--bytes 40000] [--parallel 8] [--rounds 1]

Runs the real program (`gptcli summarize --json`, default model, 2 threads, the summarize template's
sampling with `--seed 1`) on the first `--bytes` of tinyshakespeare, alternating the two settings
each round, and prints wall time, chunks, calls and tokens for each, and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run(text: bytes, parallel: int, threads: int) -> dict:
    command = [sys.executable, "-m", "gptcli", "summarize", "--json", "--seed", "1", "--threads", str(threads)]
    command += ["--parallel", str(parallel)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    done = subprocess.run(command, input=text, capture_output=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"summarize --parallel {parallel} failed: {done.stderr.decode()[-500:]}")
    data = json.loads(done.stdout)
    return {
        "wall_s": wall,
        **{k: data[k] for k in ("chunks", "combine_levels", "completion_tokens", "prompt_tokens")},
        "calls": len(data["calls"]),
        "summary": data["summary"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=int, default=40000)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    text = CORPUS.read_bytes()[: args.bytes]
    from gptcli.tuning import kernel_flags

    flags = kernel_flags()
    print(
        f"# {args.bytes} bytes of tinyshakespeare, default model, {args.threads} threads, cpu flags: {' '.join(flags)}"
    )
    results: dict[int, list[dict]] = {1: [], args.parallel: []}
    for _ in range(args.rounds):
        for parallel in (args.parallel, 1):
            results[parallel].append(run(text, parallel, args.threads))
            print(f"parallel {parallel}: {results[parallel][-1]['wall_s']:.1f} s", file=sys.stderr)
    print("| --parallel | wall s (median) | chunks | calls | combine levels | prompt tokens | generated tokens |")
    print("|---|---|---|---|---|---|---|")
    for parallel, rows in results.items():
        last = rows[-1]
        print(
            f"| {parallel} | {statistics.median(r['wall_s'] for r in rows):.1f} | {last['chunks']} | {last['calls']} | "
            f"{last['combine_levels']} | {last['prompt_tokens']} | {last['completion_tokens']} |"
        )
    one = statistics.median(r["wall_s"] for r in results[1])
    many = statistics.median(r["wall_s"] for r in results[args.parallel])
    print(f"speed-up: {one / many:.2f}x (target >= 3x); --parallel {args.parallel} took {many:.1f} s (target < 60 s)")
    print(f"summary (--parallel {args.parallel}): {results[args.parallel][-1]['summary'][:300]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
