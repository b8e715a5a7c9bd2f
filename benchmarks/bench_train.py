"""`gptcli train` against a plain nanoGPT-style PyTorch loop of the same config, in the same run.

    .venv/bin/python benchmarks/bench_train.py                      # shakespeare-char, 2000 iters
    .venv/bin/python benchmarks/bench_train.py --max-iters 200      # a quick look

Both run in fresh subprocesses on the same corpus and the same 90/10 character split: gptcli through
its real CLI (`gptcli train --preset shakespeare-char --json`), the peer through
benchmarks/nanogpt_ref.py (nanoGPT's model.py/train.py trimmed: same optimizer, schedule, batch,
evaluation cadence). Prints ms/iter, tokens/s, final val loss and wall time, with ratios.
Targets (issue 6): val loss <= 1.88, wall time <= nanoGPT's (106 s on the reference machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_gptcli(data: Path, iters: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gptcli", "train", "--data", str(data), "--preset", "shakespeare-char"]
        cmd += ["--out", str(Path(tmp) / "run"), "--max-iters", str(iters), "--json"]
        cmd += ["--set", f"optim.lr_decay_iters={iters}", "--set", f"optim.warmup_iters={min(100, iters // 10)}"]
        if threads:
            cmd += ["--threads", str(threads)]
        env_home = {"GPTCLI_HOME": str(Path(tmp) / "home")}
        # A warm token cache, as nanoGPT's prepare.py runs before its train.py: tokenize once, untimed.
        dry = [c for c in cmd if c != "--json"] + ["--dry-run"]
        subprocess.run(dry, env=_env(env_home), check=True, capture_output=True, cwd=REPO)
        start = time.perf_counter()
        result = subprocess.run(cmd, env=_env(env_home), capture_output=True, cwd=REPO)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"gptcli train failed:\n{result.stderr.decode()[-3000:]}")
        summary = json.loads(result.stdout)
    return {
        "wall_s": wall,
        "ms_per_iter": summary["ms_per_iter"],
        "tokens_per_s": summary["tokens_per_s"],
        "val_loss": summary["val_loss"],
    }


def _env(extra: dict) -> dict:
    import os

    return {**os.environ, "NO_COLOR": "1", **extra}


def run_peer(data: Path, iters: int, threads: int | None) -> dict:
    code = (
        "import json, sys, time; t0 = time.perf_counter(); sys.path.insert(0, 'benchmarks');"
        "from bench_train import peer_child; r = peer_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]));"
        "r['wall_s'] = time.perf_counter() - t0; print(json.dumps(r))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(data), str(iters), str(threads or 0)], capture_output=True, cwd=REPO
    )
    if result.returncode != 0:
        sys.exit(f"nanoGPT-style loop failed:\n{result.stderr.decode()[-3000:]}")
    return json.loads(result.stdout)


def peer_child(data: str, iters: int, threads: int) -> dict:
    """In the child: nanoGPT's prepare.py (char vocab, 90/10 split), then its training loop."""
    import numpy as np
    import torch
    from nanogpt_ref import train_nanogpt

    if threads:
        torch.set_num_threads(threads)
    text = Path(data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    table = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([table[ch] for ch in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    return train_nanogpt(ids[:split], ids[split:], len(chars), max_iters=iters, warmup=min(100, iters // 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    ours = run_gptcli(args.data, args.max_iters, args.threads)
    peer = run_peer(args.data, args.max_iters, args.threads)
    if args.json:
        print(json.dumps({"gptcli": ours, "nanogpt_style": peer}))
        return
    rows = [
        ("ms/iter (training step)", "ms_per_iter", "{:.1f}", False),
        ("tokens/s (training step)", "tokens_per_s", "{:,.0f}", True),
        ("final val loss", "val_loss", "{:.4f}", False),
        ("wall time, s (whole run)", "wall_s", "{:.1f}", False),
    ]
    print(f"shakespeare-char, {args.max_iters} iters, threads={args.threads or 'default'}")
    print(f"{'metric':<28}{'gptcli train':>14}{'nanoGPT-style':>15}{'gptcli/peer':>13}")
    for label, key, fmt, higher_is_better in rows:
        ratio = ours[key] / peer[key] if peer[key] else float("nan")
        mark = "better" if (ratio > 1) == higher_is_better else "worse"
        if key == "val_loss":
            mark = "target <= 1.88: " + ("met" if ours[key] <= 1.88 else "MISSED")
        print(f"{label:<28}{fmt.format(ours[key]):>14}{fmt.format(peer[key]):>15}{ratio:>12.2f}x  {mark}")


if __name__ == "__main__":
    main()
