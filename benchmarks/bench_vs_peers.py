"""`gptcli bench` against its peers on the default model, in one run, with ratios.

    .venv/bin/python benchmarks/bench_vs_peers.py [-p 512] [-n 128] [-r 5] [--threads 2] [--precisions fp32,int8,int4]

Rows:
- gptcli bench, torch fp32 and onnx at each precision (one worker process per configuration);
- a hand-written transformers loop (the peer every PyTorch user would write: model(ids, cache) timed
  with perf_counter around the same synthetic ids): it checks that bench's harness adds nothing and
  shows what gptcli's torch engine gains over plain transformers;
- llama.cpp on the catalogue's Q4_1 GGUF: `llama-bench` when it is on PATH, and llama-cpp-python when
  it is installed (the same synthetic-id pp/tg loop, timed by hand).
Ratios are against transformers. The machine may be shared: run it on a quiet one for numbers to keep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def transformers_loop(folder: str, n_prompt: int, n_gen: int, reps: int, threads: int) -> dict:
    """The peer, in this (child) process: prefill and decode with transformers' own forward."""
    import time

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)

    def run(n_p: int, n_g: int) -> float:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            if n_p == 0:
                model(input_ids=torch.tensor([[1]]), past_key_values=cache, use_cache=True)
            ids = torch.tensor([rng.integers(0, vocab, n_p).tolist()]) if n_p else None
            steps = rng.integers(0, vocab, n_g).tolist()
            start = time.perf_counter()
            if ids is not None:
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for token in steps:
                model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    out = {}
    for name, (n_p, n_g) in {f"pp{n_prompt}": (n_prompt, 0), f"tg{n_gen}": (0, n_gen)}.items():
        run(n_p, min(n_g, 4))  # warm-up
        rates = [(n_p + n_g) / run(n_p, n_g) for _ in range(reps)]
        out[name] = (statistics.mean(rates), statistics.stdev(rates) if reps > 1 else 0.0)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def llama_cpp_loop(gguf: str, n_prompt: int, n_gen: int, reps: int, threads: int) -> dict:
    """llama.cpp through llama-cpp-python, in this (child) process: the same synthetic-id tests."""
    import time

    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=gguf,
        n_ctx=n_prompt + n_gen + 16,
        n_batch=max(n_prompt, 8),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()

    def run(n_p: int, n_g: int) -> float:
        llm.reset()
        if n_p == 0:
            llm.eval([1])
        ids, steps = rng.integers(0, vocab, n_p).tolist(), rng.integers(0, vocab, n_g).tolist()
        start = time.perf_counter()
        if ids:
            llm.eval(ids)
        for token in steps:
            llm.eval([token])
        return time.perf_counter() - start

    out = {}
    for name, (n_p, n_g) in {f"pp{n_prompt}": (n_prompt, 0), f"tg{n_gen}": (0, n_gen)}.items():
        run(n_p, min(n_g, 4))
        rates = [(n_p + n_g) / run(n_p, n_g) for _ in range(reps)]
        out[name] = (statistics.mean(rates), statistics.stdev(rates) if reps > 1 else 0.0)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child_json(kind: str, target: str, args: argparse.Namespace) -> dict | None:
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            target,
            "-p",
            str(args.p),
            "-n",
            str(args.n),
            "-r",
            str(args.r),
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    if proc.returncode != 0:
        print(f"{kind} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gptcli_bench(args: argparse.Namespace) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "gptcli",
        "bench",
        "-p",
        str(args.p),
        "-n",
        str(args.n),
        "-r",
        str(args.r),
        "--threads",
        str(args.threads),
        "--device",
        "cpu",
        "-o",
        "json",
        "-b",
        "torch,onnx",
        "--precision",
        args.precisions,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"gptcli bench failed:\n{proc.stderr}")
    return json.loads(proc.stdout)["results"]


def llama_bench(args: argparse.Namespace) -> dict | None:
    binary = shutil.which("llama-bench")
    if not binary:
        return None
    from gptcli.models import CATALOGUE, DEFAULT_MODEL

    gguf = CATALOGUE[DEFAULT_MODEL].gguf_path()
    if gguf is None:
        return None
    proc = subprocess.run(
        [
            binary,
            "-m",
            str(gguf),
            "-p",
            str(args.p),
            "-n",
            str(args.n),
            "-r",
            str(args.r),
            "-t",
            str(args.threads),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None
    out = {}
    for row in json.loads(proc.stdout):
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[name] = (row["avg_ts"], row["stddev_ts"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("-r", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,int8,int4")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, target = args.child
        loop = transformers_loop if kind == "transformers" else llama_cpp_loop
        print(json.dumps(loop(target, args.p, args.n, args.r, args.threads)))
        return

    from gptcli.models import resolve_model

    folder = resolve_model("smollm2-135m-instruct", notify=lambda m: print(m, file=sys.stderr)).path
    print("running gptcli bench ...", file=sys.stderr)
    records = gptcli_bench(args)
    print("running the transformers loop ...", file=sys.stderr)
    hf = child_json("transformers", str(folder), args)
    if hf is None:
        sys.exit("the transformers loop failed")
    from gptcli.models import CATALOGUE, DEFAULT_MODEL

    gguf = CATALOGUE[DEFAULT_MODEL].gguf_path()
    cpp = None
    if gguf is not None and importlib.util.find_spec("llama_cpp") is not None:
        print("running llama-cpp-python ...", file=sys.stderr)
        cpp = child_json("llama_cpp", str(gguf), args)
    peers = llama_bench(args)

    rows = []
    for r in records:
        rows.append(
            (
                r["test"],
                f"gptcli bench {r['backend']} {r['precision']}",
                r["tokens_per_s"],
                r["tokens_per_s_sd"],
                r.get("peak_rss_mib"),
            )
        )
    for test in (f"pp{args.p}", f"tg{args.n}"):
        rows.append((test, "transformers loop fp32", *hf[test], hf["peak_rss_mib"]))
        if peers and test in peers:
            rows.append((test, "llama.cpp llama-bench Q4_1", *peers[test], None))
        if cpp and test in cpp:
            rows.append((test, "llama-cpp-python Q4_1", *cpp[test], cpp["peak_rss_mib"]))
    rows.sort(key=lambda row: row[0])
    print(f"threads={args.threads}  reps={args.r}  (ratios: t/s over the transformers loop's)")
    print(f"{'test':<8} {'who':<34} {'t/s':>18} {'vs transformers':>16} {'peak RSS':>10}")
    for test, who, mean, sd, rss in rows:
        ratio = mean / hf[test][0]
        rss_text = f"{rss:.0f} MiB" if rss else ""
        print(f"{test:<8} {who:<34} {f'{mean:.2f} ± {sd:.2f}':>18} {f'{ratio:.2f}x':>16} {rss_text:>10}")
    if peers is None and cpp is None:
        print("llama.cpp: neither llama-bench on PATH nor llama-cpp-python installed; install one to add its rows")


if __name__ == "__main__":
    main()
